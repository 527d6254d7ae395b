"""`shmbroker worker` attaching to a broker: refused when the broker runs another pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import BadRequest, Broker, Client
from shmbroker.cli import main
from shmbroker.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
MULTI = ROOT / "configs" / "multi_gpu.yaml"


def broker_of(path: Path, *overrides: str) -> Broker:
    cfg = load_config(path, list(overrides))
    return Broker(16 * 2**20, stages=[s.to_broker() for s in cfg.stages], pipeline=cfg.pipeline_id())


def test_a_worker_of_another_pipeline_is_refused_naming_both(capsys: pytest.CaptureFixture[str]) -> None:
    with broker_of(DEMO) as b:
        for config, sets in ((MULTI, []), (DEMO, ["--set", "stages.infer.args.seed=1"])):
            code = main(["worker", "--config", str(config), "--stage", "preprocess", "--endpoint", b.endpoint,
                         *sets])
            err = capsys.readouterr().err
            assert code == 2, err
            mine = load_config(config, [s for s in sets if s != "--set"]).pipeline_id()
            assert f"this broker runs pipeline '{load_config(DEMO).pipeline_id()}'" in err
            assert f"not '{mine}'" in err and "Traceback" not in err


def test_the_pipeline_id_is_optional_on_the_wire_and_resources_do_not_change_it() -> None:
    demo = load_config(DEMO)
    assert load_config(DEMO, ["stages.preprocess.replicas=7", "broker.capacity=64MiB"]).pipeline_id() == \
        demo.pipeline_id()
    assert load_config(DEMO, ["stages.infer.batch=4"]).pipeline_id() != demo.pipeline_id()
    with broker_of(DEMO) as b, Client(b.endpoint) as c:
        assert c.register("preprocess") == 0  # an older client says nothing: accepted
        assert c.register("infer", pipeline=demo.pipeline_id()) == 1
        with pytest.raises(BadRequest, match="not 'other@1'"):
            c.register("infer", pipeline="other@1")
        with pytest.raises(BadRequest, match="this broker runs pipeline"):
            c.configure([s.to_broker() for s in demo.stages], pipeline="other@1")
