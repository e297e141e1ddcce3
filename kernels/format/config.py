"""``quantization_config``: the block of config.json that makes a model folder an AAAC checkpoint."""

import json
from pathlib import Path

from .errors import AAACError
from .layout import BITS, CODEBOOK_SIZE, FORMAT_VERSION, NUM_CODEBOOKS, PACK_FACTOR

QUANT_METHOD = "aaac"


def quantization_config(group_size: int, modules_to_not_convert: list[str]) -> dict:
    """The ``quantization_config`` an AAAC checkpoint carries in its config.json."""
    return {
        "quant_method": QUANT_METHOD,
        "bits": BITS,
        "group_size": group_size,
        "num_codebooks": NUM_CODEBOOKS,
        "codebook_size": CODEBOOK_SIZE,
        "format_version": FORMAT_VERSION,
        "modules_to_not_convert": modules_to_not_convert,
    }


def check_quant_config(quant: dict, where: str) -> None:
    """Refuse a quantization_config this code cannot read; ``where`` names its file in the message."""
    if quant.get("format_version") != FORMAT_VERSION:
        raise AAACError(
            f"{where}: AAAC format_version {quant.get('format_version')!r} is not supported "
            f"(this aaac-vllm reads version {FORMAT_VERSION}); upgrade aaac-vllm or re-quantize"
        )
    expected = {"bits": BITS, "num_codebooks": NUM_CODEBOOKS, "codebook_size": CODEBOOK_SIZE}
    for key, value in expected.items():
        if quant.get(key) != value:
            raise AAACError(f"{where}: quantization_config.{key} is {quant.get(key)!r}, AAAC requires {value}")
    group_size = quant.get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % PACK_FACTOR:
        raise AAACError(
            f"{where}: quantization_config.group_size is {group_size!r}, expected a positive multiple of {PACK_FACTOR}"
        )
    skipped = quant.get("modules_to_not_convert", [])
    if not isinstance(skipped, list) or not all(isinstance(name, str) for name in skipped):
        raise AAACError(f"{where}: quantization_config.modules_to_not_convert must be a list of module names")


def read_config(path: Path) -> dict:
    """config.json of a model folder."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AAACError(f"{path} is not a Hugging Face model folder: it has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AAACError(f"{config_file} is not valid JSON ({exc})") from None


def read_quant_config(path: Path) -> tuple[dict, dict]:
    """(config.json, its AAAC quantization_config or {} for any other model), checked against this format."""
    config = read_config(path)
    quant = config.get("quantization_config")
    if quant is None or quant.get("quant_method") != QUANT_METHOD:
        return config, {}
    check_quant_config(quant, str(path / "config.json"))
    return config, quant


def write_config(source_config: dict, target: Path, quant_config: dict) -> None:
    """The source's config.json with ``quant_config`` as its quantization_config, into ``target``."""
    config = dict(source_config)
    config["quantization_config"] = quant_config
    # Readers that predate rope_parameters fall back to rope_theta = 10000 and
    # silently degrade the model: keep the value at the top level too.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
