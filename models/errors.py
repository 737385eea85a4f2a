"""The errors biozoo raises for bad input (defined in `biozoo._core`, shared by models/, envs/ and train/)."""

from biozoo._core import (BiozooError, CheckpointError, DataNotFoundError, ShapeError, SpecError,  # noqa: F401
                          UnknownNameError, check_choice, check_shape, first_line, suggest)
