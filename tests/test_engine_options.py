"""Engine options are declared once (EngineConfig's fields with their help); LLM(**options) and
every command's flags derive from that declaration, so none can drift from the others."""

from __future__ import annotations

import dataclasses

import pytest

from engine import LLM
from engine.config import EngineConfig
from entrypoints.cli import build_parser
from entrypoints.engine_args import engine_config, engine_options


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_every_option_has_help_and_a_flag_on_every_engine_command():
    assert {f.name for f in engine_options()} == {f.name for f in dataclasses.fields(EngineConfig)} - {"model_dir"}
    for f in engine_options():
        assert f.metadata.get("help"), f"EngineConfig.{f.name} has no help"
    for command in ("serve", "worker", "generate"):
        args = _parse(command)
        expected = {f.name for f in engine_options()} - ({"seed"} if command == "generate" else set())
        assert set(args.engine_options) == expected, command
        # Unset flags give the declared defaults.
        assert engine_config(args, "m") == EngineConfig(model_dir="m"), command


def test_flags_set_the_fields_they_are_named_for():
    args = _parse("serve", "--kv-cache-memory-fraction", "0.2", "--no-prefix-caching", "--batch-invariant",
                  "--max-model-len", "512", "--kv-cache-dtype", "fp8", "--worker-heartbeat-timeout", "7",
                  "--no-async-scheduling", "--seed", "3")
    config = engine_config(args, "m")
    assert (config.kv_cache_memory_fraction, config.enable_prefix_caching, config.batch_invariant,
            config.max_model_len, config.kv_cache_dtype, config.worker_heartbeat_timeout_s,
            config.async_scheduling, config.seed) == (0.2, False, True, 512, "fp8", 7.0, False, 3)
    # generate's --seed is the requests' sampling seed, not the engine's.
    gen = _parse("generate", "--seed", "5")
    assert gen.seed == 5 and engine_config(gen, "m").seed == 0


def test_a_flag_outside_its_choices_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit):
        _parse("serve", "--kv-cache-dtype", "int4")
    assert "--kv-cache-dtype" in capsys.readouterr().err


def test_llm_refuses_an_unknown_option_before_starting_anything(tiny_checkpoint):
    with pytest.raises(TypeError, match=r"unknown engine options \['kv_cache_fraction'\]"):
        LLM(tiny_checkpoint, kv_cache_fraction=0.1)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(tiny_checkpoint, kv_cache_dtype="int4")


@pytest.mark.parametrize("options,message", [
    ({"kv_offload_memory": 1 << 20, "enable_prefix_caching": False}, "need prefix caching on"),
    ({"kv_disk_cache_dir": "/tmp/x", "enable_prefix_caching": False}, "need prefix caching on"),
    ({"kv_offload_memory": -1}, "kv_offload_memory must be a number of bytes >= 0"),
    ({"kv_disk_cache_size": 0}, "kv_disk_cache_size must be a positive number of bytes"),
])
def test_the_prefix_cache_tiers_refuse_what_cannot_work(options, message):
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig("model", **options)


def test_the_cli_names_a_bad_option_in_one_line_and_exits_2(tiny_checkpoint, capsys, tmp_path):
    from entrypoints.cli import main

    not_a_load_file = tmp_path / "load.json"
    not_a_load_file.write_text("[]")
    for flags, problem in [(["--ep-size", "3"], "ep_size 3 does not divide the model's 16 routed experts"),
                           (["--ep-size", "2", "--enable-eplb", "--eplb-load-file", str(not_a_load_file)],
                            "is not an expert load file")]:
        assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mlaserve generate: error: ") and problem in err and "Traceback" not in err
