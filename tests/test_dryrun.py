"""The dry run: the real step compiled for N emulated devices from abstract shapes, and XLA's analysis read back."""
import json
import os
import subprocess
import sys
from pathlib import Path

from jaxchat import dryrun

ROOT = Path(__file__).resolve().parent.parent

HLO = """HloModule jit_step, entry_computation_layout={()->()}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %x, f32[] %y)
}

%inner_body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %ag = bf16[16,4]{1,0} all-gather(bf16[2,4]{1,0} %w), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}
}

%outer_body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %w = (s32[], f32[8,4]{1,0}) while((s32[], f32[8,4]{1,0}) %p), condition=%c, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %ars = (f32[8,4]{1,0}, f32[8,4]{1,0}) all-reduce-start(f32[8,4]{1,0} %a, f32[8,4]{1,0} %b), to_apply=%add
  %ard = (f32[8,4]{1,0}, f32[8,4]{1,0}) all-reduce-done((f32[8,4]{1,0}, f32[8,4]{1,0}) %ars)
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %loop = (s32[], f32[8,4]{1,0}) while((s32[], f32[8,4]{1,0}) %t), condition=%c2, body=%outer_body, backend_config={"known_trip_count":{"n":"2"}}
  %rs = f32[1,4]{1,0} reduce-scatter(f32[8,4]{1,0} %a), channel_id=1, dimensions={0}, to_apply=%add
  ROOT %r = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %a), channel_id=2, to_apply=%add
}
"""


def test_collective_bytes_count_loop_bodies_by_their_trip_counts():
    c = dryrun.collective_bytes(HLO)
    # all-gather: 16*4 bf16 = 128 bytes, in a loop of 3 inside a loop of 2.
    assert c["all-gather"] == {"bytes": 128 * 6, "count": 6}
    # all-reduce: the async pair counts once (two f32[8,4] = 256 bytes, twice by the outer loop) plus the entry's one.
    assert c["all-reduce"] == {"bytes": 256 * 2 + 128, "count": 3}
    assert c["reduce-scatter"] == {"bytes": 16, "count": 1}
    assert c["all-to-all"]["count"] == 0 and c["unknown_trip_counts"] == 0


def test_shape_bytes_reads_tuples_and_scalars():
    assert dryrun.shape_bytes("(bf16[2,3]{1,0}, f32[])") == 2 * 6 + 4
    assert dryrun.shape_bytes("pred[10]") == 10


def run_dryrun(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the dry run sets its own device count
    return subprocess.run([sys.executable, "-m", "jaxchat.dryrun", "--config=configs/tiny.py", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_compiles_the_step_and_engine_for_emulated_devices_and_says_whether_it_fits():
    r = run_dryrun("--devices=4", "--config.depth=2")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["mesh"] == [1, 4] and report["attention"] == "chunked"
    assert report["fits"] and 0 < report["memory"]["need_bytes"] < 2**30
    assert report["flops_per_step"] > 0
    assert report["engine"]["decode"]["rows"] == 32 and report["engine"]["prefill"]["need_bytes"] > 0
    assert "CPU stand-in for cuDNN" in r.stdout
    # A card too small: the same program does not fit, the exit status says so.
    r = run_dryrun("--devices=4", "--config.depth=2", "--device-memory-gib=0.01", "--no-engine=1")
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout


def test_dry_run_rejects_unknown_arguments():
    r = run_dryrun("--devicez=4")
    assert r.returncode == 2 and "unrecognized arguments: --devicez=4" in r.stderr


def _activation_collectives(hlo: str, seq: int) -> list[tuple[str, int]]:
    """(line, bytes) of the collectives whose result has a sequence-length dimension: activations or token ids (no
    weight here has that size)."""
    found = []
    for line in hlo.splitlines():
        m = dryrun._COLLECTIVE.search(line)
        if m and any(str(seq) in dims.split(",") for _, dims in dryrun._SHAPE.findall(m.group(1))):
            found.append((line.strip()[:160], dryrun.shape_bytes(m.group(1))))
    return found


import pytest  # noqa: E402


@pytest.mark.parametrize("mesh_data,mesh_fsdp", [(1, 4), (4, 1), (2, 2)])
def test_activations_stay_batch_sharded_and_only_weights_and_gradients_move(mesh_data, mesh_fsdp):
    import jax

    from jaxchat import config as C

    # T = 96 is no weight's dimension (width 256, MLP 1,024, vocab 512, heads of 64), so any collective with a
    # 96-long axis moves activations or token ids. Four layers: a collective per layer would show.
    B, T = 5, 96  # 20 rows in all: no other array of the step has a 20 x 96 shape
    cfg = C.load_config(["--config=configs/tiny.py", "--config.depth=4", "--config.vocab_size=512",
                         f"--config.sequence_len={T}", f"--config.device_batch_size={B}",
                         f"--config.mesh_data={mesh_data}", f"--config.mesh_fsdp={mesh_fsdp}"])
    prog = dryrun.TrainProgram(cfg, "chunked", jax.devices()[:4])
    hlo = prog.compiled.as_text()
    moved = _activation_collectives(hlo, T)
    if mesh_fsdp == 1:
        assert moved == []
    else:
        # With the table split on `embed`, the lookup itself re-shards the looked-up rows (an all-to-all each way) and
        # gathers the token ids: one embedding's worth, never a collective per layer.
        rows_bytes = B * T * 256 * 4
        assert sum(b for _, b in moved) <= 2 * rows_bytes + 4 * B * T * 4, moved
    # Each device computes on its own B rows, never the global 4·B (only the token ids are gathered, above).
    assert f"f32[{4 * B},{T}" not in hlo and f"f32[{B},{T}" in hlo
    c = dryrun.collective_bytes(hlo)
    param_bytes = 4 * prog.d.num_params
    if mesh_fsdp == 1:  # pure data parallelism: weights replicated; gradient all-reduces, Muon's gathered updates
        assert c["all-to-all"]["count"] == 0 and c["all-gather"]["bytes"] <= param_bytes
