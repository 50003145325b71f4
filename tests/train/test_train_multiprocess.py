"""Multi-host: two processes on 127.0.0.1 (gloo CPU collectives, jax.distributed), two
simulated devices each, train exactly like one process with four devices."""

import socket
import subprocess

import numpy as np

from train_helpers import losses, run_train, subprocess_env, train_command


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(token_data, compile_cache,
                                                           tmp_path):
  flags = {"model": "qwen-tiny", "optimizer": "sophia_lambda", "steps": 4, "batch-size": 8,
           "seq-len": 32, "data": token_data, "mesh": "data=2,fsdp=2", "eval-every": 4,
           "eval-batches": 2, "checkpoint-every": 0, "compute-dtype": "float32",
           "hessian-interval": 2, "tensorboard": "false"}
  port = _free_port()
  workers = [
      subprocess.Popen(
          train_command({**flags, "out": tmp_path / "multi",
                         "coordinator": f"127.0.0.1:{port}", "num-processes": 2,
                         "process-id": i}),
          env=subprocess_env(2, compile_cache), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  single = run_train({**flags, "out": tmp_path / "single"}, subprocess_env(4, compile_cache))
  outputs = [w.communicate(timeout=300)[0] for w in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-4000:]
  assert "x 2 process(es)" in outputs[0] and "x 1 process(es)" in single.stdout
  multi_losses, single_losses = losses(tmp_path / "multi"), losses(tmp_path / "single")
  assert len(multi_losses) == 4
  np.testing.assert_allclose(multi_losses, single_losses, rtol=0, atol=1e-5)
  # The evaluation (each process reads its validation rows) agrees too.
  import json
  multi_val = json.loads((tmp_path / "multi" / "summary.json").read_text())["final_val_loss"]
  single_val = json.loads((tmp_path / "single" / "summary.json").read_text())["final_val_loss"]
  assert abs(multi_val - single_val) < 1e-5
