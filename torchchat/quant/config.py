"""`--quantize`: a JSON object (inline, a file, or a shipped profile name) of schemes, in order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchchat.errors import TorchchatError

PROFILES = Path(__file__).parent / "profiles"
GROUP_SIZES = (32, 64, 128, 256)

# scheme -> {argument: (type, default)}; None default = required.
_SCHEMES: dict[str, dict[str, tuple[type, Any]]] = {
    "linear:int8": {"bitwidth": (int, 8), "groupsize": (int, 0)},
    "linear:int4": {"groupsize": (int, 128)},
    "linear:a8w4dq": {"groupsize": (int, 256)},
    "linear:gptq": {
        "groupsize": (int, 128),
        "calibration_file": (str, None),
        "calibration_tasks": (str, None),  # comma list of lm-eval tasks
        "calibration_limit": (int, None),  # documents per calibration task
        "calibration_seq_length": (int, 256),
        "calibration_samples": (int, 32),
        "percdamp": (float, 0.01),
        "blocksize": (int, 128),
    },
    "embedding": {"bitwidth": (int, 8), "groupsize": (int, 0)},
    "precision": {"dtype": (str, None)},
    "executor": {"accelerator": (str, None)},
}
_ALIASES = {"linear:8da4w": "linear:a8w4dq"}
_SYNONYMS = {"group_size": "groupsize"}


@dataclass(frozen=True)
class Scheme:
    """One step of a quantization recipe, its arguments filled in and checked."""

    name: str
    args: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {self.name: dict(self.args)}


def load_quantize_spec(spec: str) -> list[Scheme]:
    """Parse an inline JSON object, a path to a JSON file, or a shipped profile name."""
    text = spec.strip()
    if text[:1] not in ("{", "["):
        path = Path(text).expanduser()
        if not path.is_file() and (PROFILES / f"{text}.json").is_file():
            path = PROFILES / f"{text}.json"
        if not path.is_file():
            profiles = ", ".join(sorted(p.stem for p in PROFILES.glob("*.json")))
            raise TorchchatError(
                f"--quantize {spec!r}: not JSON, not a file, not a profile (profiles: {profiles})"
            )
        text = path.read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TorchchatError(
            f"--quantize: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    return parse_schemes(obj)


def parse_schemes(obj: Any) -> list[Scheme]:
    """Validate a decoded recipe: known schemes, known arguments of the right types and values."""
    if not isinstance(obj, dict) or not obj:
        raise TorchchatError(
            '--quantize: expected a non-empty JSON object like {"linear:int8": {"groupsize": 0}}'
        )
    schemes = []
    for raw_name, raw_args in obj.items():
        name = _ALIASES.get(raw_name, raw_name)
        if name not in _SCHEMES:
            raise TorchchatError(
                f"--quantize: unknown scheme {raw_name!r} (known: {', '.join(sorted([*_SCHEMES, *_ALIASES]))})"
            )
        if not isinstance(raw_args, dict):
            raise TorchchatError(f"--quantize: arguments of {raw_name!r} must be a JSON object")
        schemes.append(Scheme(name, _check_args(raw_name, name, raw_args)))
    return schemes


def _check_args(raw_name: str, name: str, raw: dict[str, Any]) -> dict[str, Any]:
    spec = _SCHEMES[name]
    args: dict[str, Any] = {}
    for key, value in raw.items():
        key = _SYNONYMS.get(key, key)
        if key not in spec:
            raise TorchchatError(
                f"--quantize: {raw_name!r} has no argument {key!r} (arguments: {', '.join(spec)})"
            )
        typ = spec[key][0]
        ok = (
            isinstance(value, typ)
            and not isinstance(value, bool)
            or (typ is float and isinstance(value, int))
        )
        if not ok:
            raise TorchchatError(
                f"--quantize: {raw_name}.{key} must be a {typ.__name__}, got {value!r}"
            )
        args[key] = value
    for key, (_, default) in spec.items():
        if key not in args:
            if default is None and key not in (
                "calibration_file",
                "calibration_tasks",
                "calibration_limit",
            ):
                raise TorchchatError(f"--quantize: {raw_name!r} needs argument {key!r}")
            args[key] = default
    _check_values(raw_name, name, args)
    return args


def _check_values(raw_name: str, name: str, a: dict[str, Any]) -> None:
    def bad(msg: str) -> TorchchatError:
        return TorchchatError(f"--quantize: {raw_name}: {msg}")

    if "bitwidth" in a:
        allowed = (8,) if name == "linear:int8" else (4, 8)
        if a["bitwidth"] not in allowed:
            raise bad(f"bitwidth must be one of {allowed}")
    if "groupsize" in a:
        allowed = ((0,) if name in ("linear:int8", "embedding") else ()) + GROUP_SIZES
        if a["groupsize"] not in allowed:
            raise bad(f"groupsize must be one of {allowed} (0 = per channel), got {a['groupsize']}")
    if name == "precision" and a["dtype"] not in ("fp32", "bf16", "fp16", "fast"):
        raise bad("dtype must be fp32, bf16, fp16 or fast")
    if name == "executor" and a["accelerator"] not in ("cpu", "cuda", "mps", "fast"):
        raise bad("accelerator must be cpu, cuda, mps or fast")
    if name == "linear:gptq" and (
        a["calibration_seq_length"] < 2
        or a["calibration_samples"] < 1
        or not 0 <= a["percdamp"] < 1
    ):
        raise bad("calibration_seq_length >= 2, calibration_samples >= 1, 0 <= percdamp < 1")
    if name == "linear:gptq" and a["calibration_limit"] is not None and a["calibration_limit"] < 1:
        raise bad("calibration_limit must be at least 1")
