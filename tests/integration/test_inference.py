"""Inference through the live server: small inputs in the web process, large ones on a Celery worker."""

import pytest
import torch

from tests.helpers import tiny_net
from tests.integration.conftest import Session

pytestmark = pytest.mark.integration


def test_inference_large_input_runs_on_the_worker_small_in_the_web_process(fl: Session):
    model_id = fl.api.upload_model(fl.actor, tiny_net(5))
    module = tiny_net(5).eval()
    small = torch.rand(2, 4)
    large = torch.rand(40, 4)  # 160 values: above the worker threshold of the worker mode
    for rows in (small, large):
        body = {"model_id": model_id, "model_input": rows.tolist()}
        answer = fl.api.ok("POST", "/inference/", fl.actor, 200, json=body)
        torch.testing.assert_close(torch.tensor(answer["inference"]), module(rows), rtol=1e-5, atol=1e-5)
        assert answer["method"] == "NONE"
    if fl.stack.mode == "worker":
        fl.stack.worker.wait_for_log("fl_server_ai.tasks.run_inference", 30)
    else:
        assert "run_inference" not in "".join(s.log_text() for s in fl.stack.services)
