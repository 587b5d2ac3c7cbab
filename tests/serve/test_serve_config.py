"""Serve settings, config.yaml and input decoding: fast checks without Ray."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import yaml
from serve_testlib import png_bytes, png_header_bomb

from serve.config import AppArgs, check_serve_settings
from serve.engine import check_params, make_prompt, trim
from serve.preprocess import InputError, decode_base64, decode_image, preprocess_image

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


def test_config_yaml_is_valid_serve_config_and_follows_the_rules():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)  # Ray's own schema for `serve deploy`
    assert schema.http_options.host == "127.0.0.1"
    app = raw["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    args = AppArgs.model_validate(app["args"])
    (dep,) = app["deployments"]
    assert dep["name"] == "PaLIServer"
    check_serve_settings(args.max_batch_size, dep["max_ongoing_requests"], dep["autoscaling_config"])
    assert dep["autoscaling_config"]["downscale_delay_s"] >= 10 * dep["autoscaling_config"]["upscale_delay_s"]


@pytest.mark.parametrize("mbs, mor, auto, needle", [
    (16, 8, None, "max_ongoing_requests=8 < max_batch_size=16"),
    (8, 40, {"target_ongoing_requests": 16}, "20-50 %"),
    (8, 16, {"target_ongoing_requests": 16}, "20-50 %"),
    (8, 24, {"target_ongoing_requests": 16, "upscale_delay_s": 10, "downscale_delay_s": 10}, "downscale"),
    (8, 24, {"target_ongoing_requests": 16, "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
])
def test_bad_serve_settings_are_rejected(mbs, mor, auto, needle):
    with pytest.raises(ValueError, match=needle):
        check_serve_settings(mbs, mor, auto)
    check_serve_settings(8, 24, {"target_ongoing_requests": 16})


def test_app_args_validation():
    with pytest.raises(ValueError, match="default_model 'x'"):
        AppArgs(models={"a": "/tmp/a"}, default_model="x")
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        AppArgs(models={"a": "/tmp/a"}, max_batch_size=64)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AppArgs(models={"a": "/nonexistent/ckpt"}).check_checkpoints()
    assert AppArgs(models={"a": "/x", "b": "/y"}).default == "a"


def test_decode_image_errors():
    good = png_bytes(3)
    assert decode_image(good, 10_000).size == (48, 48)
    with pytest.raises(InputError, match="not a recognised image"):
        decode_image(b"hello, world, not an image", 10_000)
    with pytest.raises(InputError, match="truncated or corrupt"):
        decode_image(good[: len(good) // 2], 10_000)
    with pytest.raises(InputError, match="48x48 = 2304 pixels; expected at most 1000") as e:
        decode_image(good, 1000)
    assert e.value.status == 413
    with pytest.raises(InputError, match="not valid base64"):
        decode_base64("@@not base64@@")
    assert decode_base64("data:image/png;base64," + base64.b64encode(good).decode()) == good


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_header_bomb(20000, 20000)  # claims 400 Mpx in a few dozen bytes
    assert len(bomb) < 200
    with pytest.raises(InputError, match="400000000 pixels") as e:
        decode_image(bomb, 25_000_000)
    assert e.value.status == 413


def test_preprocess_shape_and_range():
    x = preprocess_image(decode_image(png_bytes(1), 10_000), 64)
    assert x.shape == (3, 64, 64) and x.dtype.name == "float32"
    assert -1.0 <= x.min() < x.max() <= 1.0


def test_prompts_and_params():
    assert make_prompt("caption", "fr", None) == "Generate the alt_text in fr at 0:"
    assert make_prompt("vqa", "de", "what colour?") == "Answer in de: what colour?"
    assert make_prompt("raw", "en", "anything") == "anything"
    for args, needle in [(("translate", "en", None), "unsupported task 'translate'"),
                         (("caption", "xx", None), "unsupported language 'xx'"),
                         (("vqa", "en", None), "needs the question"),
                         (("caption", "en", "hi"), "takes no prompt")]:
        with pytest.raises(InputError, match=needle):
            make_prompt(*args)
    lim = {"max_new_tokens_limit": 32, "max_beams": 4, "max_temperature": 2.0}
    assert check_params(8, 1, 0.0, **lim).generate_kwargs()["do_sample"] is False
    for args, needle in [((0, 1, 0.0), "max_new_tokens=0"), ((33, 1, 0.0), "expected 1..32"),
                         ((8, 5, 0.0), "num_beams=5"), ((8, 1, -1.0), "temperature=-1.0"),
                         ((8, 1, float("nan")), "temperature=nan"), ((8, 2, 0.7), "sampling needs")]:
        with pytest.raises(InputError, match=needle):
            check_params(*args, **lim)
    assert trim([5, 6, 1, 0, 0]) == [5, 6, 1] and trim([5, 0, 0]) == [5]


def test_launcher_ingress_flags(capsys):
    from serve.__main__ import parse_args
    from serve.config import INGRESS_ENV, ingress_env

    assert parse_args(["--checkpoint", "c"]).ingress == "proxy" and ingress_env("proxy") == {}
    assert parse_args(["--checkpoint", "c", "--ingress", "haproxy"]).ingress == "haproxy"
    env = ingress_env("haproxy")
    assert {k: env[k] for k in INGRESS_ENV["haproxy"]} == {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                                                           "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)  # the loopback-admin launcher
    ingress_env("haproxy")["X"] = "1"  # a copy: callers cannot change the table
    assert "X" not in INGRESS_ENV["haproxy"]
    with pytest.raises(ValueError, match="unknown ingress 'nginx'"):
        ingress_env("nginx")
    with pytest.raises(SystemExit):  # a running cluster's ingress was fixed when its nodes started
        parse_args(["--checkpoint", "c", "--address", "auto", "--ingress", "haproxy"])
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in capsys.readouterr().err
