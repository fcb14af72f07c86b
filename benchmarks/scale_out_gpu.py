"""Accelerate's engines on the COCO-size captioner, one GPU each, bf16: DDP, FSDP2, FSDP1,
DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed needs `pip install deepspeed`). Needs CUDA.

    python benchmarks/scale_out_gpu.py [--steps 20] [--engines ddp,fsdp2,zero3]

Each engine runs `recipes/xe.py` through torchrun: 2N steps with a checkpoint at N and a beam-3
evaluation at the end (generation under the engine), then a copy of the run resumed from step N.
Per engine it prints seconds per step, peak GPU memory, the evaluation's CIDEr and the largest
difference between the final weights of the two runs (GPU kernels may be non-deterministic; on
CPU the same check is bitwise, tests/test_fsdp_multinode.py). The last line is FSDP2 against DDP.
The model is coco.yaml's Transformer (d512, 6+6 layers, 50 regions x 2048) on the synthetic
scenes, whose vocabulary is small (the logits layer is not COCO's 10k words).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}
DEEPSPEED = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}
ENGINES = {
    "ddp": {},
    "fsdp2": {**FSDP, "FSDP_VERSION": "2"},
    "fsdp1": {**FSDP, "FSDP_VERSION": "1"},
    "zero2": {**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3": {
        **DEEPSPEED,
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
    },
}
COCO_SIZE = [
    "mixed_precision=bf16",
    "data.synthetic.feat_dim=2048",
    "data.max_feat_num=50",
    "model.transformer.d_model=512",
    "model.transformer.num_heads=8",
    "model.transformer.num_encoder_layers=6",
    "model.transformer.num_decoder_layers=6",
    "model.transformer.ffn_dim=2048",
    "train.batch_size=16",
    "train.clip_grad.mode=norm",
    "train.clip_grad.max=1.0",
    "train.ema_decay=0",
    "eval.splits=[val]",
    "data.synthetic.num_val=50",
    "data.synthetic.num_test=50",
]
SPEED = re.compile(r"\(([\d.]+) s/step.*?(?:peak GPU memory (\d+) MiB)?$", re.M)


def run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])


def engine_run(name: str, out: Path, steps: int) -> dict[str, float]:
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "1", str(REPO / "recipes" / "xe.py")]
    cmd += ["--config", str(REPO / "recipes" / "synthetic.yaml"), *COCO_SIZE]
    cmd += [f"train.max_steps={2 * steps}", f"checkpoint.every={steps}", "checkpoint.keep=2"]
    cmd += [
        f"eval.every={2 * steps}",
        f"train.log_every={steps}",
        f"train.timer_warmup={steps // 4}",
    ]
    cmd += [f"data.synthetic.num_train={16 * 2 * steps}"]
    full = out / "full"
    run([*cmd, f"output_dir={full}"], ENGINES[name])
    resumed = out / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{2 * steps}")
    shutil.rmtree(resumed / "eval")
    run([*cmd, f"output_dir={resumed}", "--resume"], ENGINES[name])

    seconds, peak = SPEED.search((full / "log.txt").read_text()).groups()
    final = [load_file(str(d / "checkpoints" / f"step_{2 * steps}" / "model.safetensors"))
             for d in (full, resumed)]  # fmt: skip
    diff = max((final[0][k].float() - final[1][k].float()).abs().max().item() for k in final[0])
    cider = json.loads((full / "eval" / f"val_step{2 * steps}.json").read_text())["metrics"]
    return {"s/step": float(seconds), "peak MiB": float(peak or "nan"), "resume max diff": diff,
            "CIDEr": cider["CIDEr"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA: DeepSpeed and FSDP1 run on GPUs only (FSDP2 on CPU is tested)")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.engines.split(","):
            try:
                results[name] = engine_run(name, Path(tmp) / name, args.steps)
            except Exception as err:  # report the others even when one engine fails
                print(f"{name}: FAILED: {err}", flush=True)
                continue
            print(f"{name}: {results[name]}", flush=True)
    if "ddp" in results and "fsdp2" in results:
        ratio = results["fsdp2"]["s/step"] / results["ddp"]["s/step"]
        print(f"ratio {ratio:.2f}x (FSDP2 vs DDP step time, COCO-size captioner, bf16, 1 GPU)")


if __name__ == "__main__":
    main()
