"""Preprocessing ops, chosen by a string spec such as `decode|resize(32)|onehot(10)`.

One home for every fact about an op: `registry` (each op's host factory, whether it is
random or a label op, its JAX and TF twins, whether it may close a spec on the device,
and the spec parser), the ops by kind (`image`, `label`, `decode`, `randaug`), their
twins (`device` for JAX, `tf_twins` for the serving export), and `planning.plan`, which cuts a
spec into a host part and a device part for every caller alike. Adding an op is one
function registered, with its properties, in one of the op modules.

Importing this package loads the host ops (NumPy and PIL), never JAX or TensorFlow.
"""

from __future__ import annotations

# Importing the op modules registers their ops.
from vitcls.data.pp import decode, image, label, randaug  # noqa: F401
from vitcls.data.pp.decode import DecodeError
from vitcls.data.pp.planning import Plan, plan
from vitcls.data.pp.registry import (DeviceInputError, Op, OpInfo, Preprocess,
                                     PreprocessError, available_ops, parse)

__all__ = ["DecodeError", "DeviceInputError", "Op", "OpInfo", "Plan", "Preprocess",
           "PreprocessError", "available_ops", "parse", "plan"]
