"""ImageNet-1k from an ImageFolder layout, for the CTM's ImageNet config (arXiv 2505.05522, section 4.1).

Expects `data_dir/train/<wnid>/*.JPEG` and `data_dir/val/<wnid>/*.JPEG` (the usual torchvision layout; run
torchvision's or any standard script to sort the validation images into class folders). The validation split
of the training run comes from the train folder (`val_fraction`); `val/` is the test set. Nothing is downloaded.
"""

from __future__ import annotations


from biozoo._core import DataSpec

from .datamodules import TorchvisionDataModule, image_spec

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetDataModule(TorchvisionDataModule):
    dataset_name = "ImageNet-1k"
    where = "{train,val}/<wnid>/*.JPEG"

    def __init__(self, data_dir: str = "data/imagenet", batch_size: int = 64, num_workers: int = 8, seed: int = 0,
                 val_fraction: float = 0.01, image_size: int = 224):
        super().__init__(data_dir, False, batch_size, num_workers, seed, val_fraction)
        self.image_size = image_size

    @property
    def spec(self) -> DataSpec:
        return image_spec(3, self.image_size, self.image_size, 1000)

    def transform(self, train: bool):
        from torchvision import transforms as T

        norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
        if train:
            return T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()] + norm)
        return T.Compose([T.Resize(int(self.image_size * 256 / 224)), T.CenterCrop(self.image_size)] + norm)

    def make_dataset(self, train: bool, download: bool, transform):
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(self.data_dir / ("train" if train else "val")), transform=transform)
