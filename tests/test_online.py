"""On an online task no model that links sees the future: changing steps > t leaves every answer at <= t as it was.
The CTM reads the order of a float sequence (its answer changes when the steps are shuffled); a setting a user
gives the CTM is honoured or refused, never replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biozoo._core import DataSpec, SpecError, as_output
from biozoo.models import create_model, kwargs_for_spec
from biozoo.train.matrix import check_pair, model_configs, model_entry

ONLINE = DataSpec("sequence", (12, 3), "classes", num_classes=3, positions=(12,), online=True,
                  extras={"fixation_label": 0})
MODELS = model_configs()


def build(config_name: str, spec: DataSpec) -> torch.nn.Module:
    name, kwargs = model_entry(MODELS[config_name])
    torch.manual_seed(0)
    return create_model(name, **kwargs_for_spec(name, spec, kwargs)).eval()


def linking(spec: DataSpec) -> list[str]:
    out = []
    for m in MODELS:
        name, kwargs = model_entry(MODELS[m])
        try:
            kwargs_for_spec(name, spec, kwargs)
        except SpecError:
            continue
        except ImportError:  # an optional peer library that is not installed
            continue
        out.append(m)
    return out


def test_the_sequence_models_link_and_the_whole_sequence_readers_refuse():
    names = linking(ONLINE)
    assert {"lstm", "transformer", "ctm_online", "ccrnn"} <= set(names)
    for refused in ("mlp", "ctm", "ctm_lstm", "ctm_parity"):
        assert refused not in names
        with pytest.raises(SpecError, match=f"^{refused} cannot take online sequences"):
            kwargs_for_spec(model_entry(MODELS[refused])[0], ONLINE, model_entry(MODELS[refused])[1])


@pytest.mark.parametrize("config", linking(ONLINE))
def test_no_linked_model_sees_the_future(config):
    model = build(config, ONLINE)
    torch.manual_seed(1)
    x = torch.randn(2, 12, 3)
    with torch.no_grad():
        base = as_output(model(x)).logits
        assert base.shape == (2, 3, 12)
        for t in (0, 5, 10):
            later = x.clone()
            later[:, t + 1:] = torch.randn_like(later[:, t + 1:]) * 3
            out = as_output(model(later)).logits
            assert torch.allclose(out[..., :t + 1], base[..., :t + 1], atol=1e-5), (config, t)
            assert not torch.allclose(out[..., t + 1:], base[..., t + 1:], atol=1e-5), (config, t)


def shuffled_change(model: torch.nn.Module, x: torch.Tensor) -> float:
    torch.manual_seed(3)
    with torch.no_grad():
        return (as_output(model(x)).logits - as_output(model(x[:, torch.randperm(x.size(1))])).logits).abs().max().item()


def test_the_ctm_reads_time_order():
    torch.manual_seed(2)
    np.random.seed(2)  # the CTM draws its synchronisation pairs with numpy (as the official code does)
    offline = DataSpec("sequence", (8, 8), "classes", num_classes=10)  # seqdigits: rows as tokens, one answer
    x = torch.randn(2, 8, 8)
    blind = create_model("ctm", **kwargs_for_spec("ctm", offline, {**model_entry(MODELS["ctm"])[1],
                                                                    "positional_embedding_type": "none"})).eval()
    assert shuffled_change(blind, x) < 2e-5  # without positions attention is order-blind (the old default)
    assert shuffled_change(build("ctm", offline), x) > 1e-4
    assert shuffled_change(build("ctm_online", ONLINE), torch.randn(2, 12, 3)) > 1e-3


def test_a_ctm_setting_is_honoured_or_refused():
    offline = DataSpec("sequence", (8, 8), "classes", num_classes=10)
    assert kwargs_for_spec("ctm", offline, {"positional_embedding_type": "none"})["positional_embedding_type"] == "none"
    flat = DataSpec("features", (6,), "classes", num_classes=2)
    with pytest.raises(SpecError, match="^ctm .*positional_embedding_type='custom-rotational-1d'"):
        kwargs_for_spec("ctm", flat, {"positional_embedding_type": "custom-rotational-1d"})


def test_the_transformer_refuses_to_be_built_non_causal_on_an_online_task():
    with pytest.raises(SpecError, match="causal=False"):
        kwargs_for_spec("transformer", ONLINE, {"causal": False})


def test_matrix_says_why_ctm_parity_does_not_fit_gonogo():
    from biozoo.train.matrix import task_configs

    pytest.importorskip("neurogym")
    reason = check_pair(task_configs()["neurogym"], MODELS["ctm_parity"])
    assert reason is not None and reason.startswith("ctm_parity cannot")
