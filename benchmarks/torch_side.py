"""The PyTorch side of benchmarks/torch_parity.py, run in a venv with torch and diffusers (never imports diffax).

`python benchmarks/torch_side.py --folder DIR [--small] [--threads 2]` builds a random diffusers
UNet2DModel with the DDPM CIFAR-10 layout (Ho et al. 2020; google/ddpm-cifar10-32's config, dropout
0.1 as in the paper's CIFAR-10 run) or a small one, saves it with a DDIMScheduler config in DIR (what
`diffax import-diffusers` reads), prints one JSON line, then answers JSON commands on stdin, one
line each, with one JSON line:
  {"op": "train", "batch": B}                 one train step: eps-prediction MSE at a random t,
                                              backward, global-norm clipping 1.0, Adam, EMA;
  {"op": "sample", "batch": B, "steps": N}    DDIM (eta 0) with DDIMScheduler, N network calls;
  {"op": "profile", "kind": ..., "batch": B, "steps": N, "out": PATH}   torch.profiler per-op table;
  {"op": "quit"}.
Each timed answer is {"seconds": wall seconds of that call}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel

DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, dropout=0.1,
)
# The same block types at a fraction of the width and depth: a quick run and the test's setting.
SMALL = {**DDPM_CIFAR10, "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
         "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1, "norm_num_groups": 8}


class Side:
    def __init__(self, folder: str, small: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.model = UNet2DModel(**(SMALL if small else DDPM_CIFAR10))
        self.model.save_pretrained(folder, safe_serialization=True)
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(folder)
        self.scheduler = DDIMScheduler.from_pretrained(folder)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.Adam(self.params, lr=2e-4)
        self.alphas_cumprod = self.scheduler.alphas_cumprod
        self.steps_done = 0
        self.inputs: dict[int, torch.Tensor] = {}

    def images(self, batch: int) -> torch.Tensor:
        if batch not in self.inputs:
            g = torch.Generator().manual_seed(batch)
            self.inputs[batch] = torch.rand((batch, 3, self.model.config.sample_size, self.model.config.sample_size),
                                            generator=g) * 2 - 1
        return self.inputs[batch]

    def train(self, batch: int) -> None:
        """One optimizer step as a PyTorch DDPM trainer (diffusers' train_unconditional) takes it."""
        self.model.train()
        x0 = self.images(batch)
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(self.model(xt, t).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        decay = min(0.999, (1 + self.steps_done) / (10 + self.steps_done))  # diffax's EMA warm-up
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        self.steps_done += 1
        float(loss.detach())

    @torch.inference_mode()
    def sample(self, batch: int, steps: int) -> None:
        self.model.eval()
        self.scheduler.set_timesteps(steps)
        size = self.model.config.sample_size
        x = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(1))
        for t in self.scheduler.timesteps:
            x = self.scheduler.step(self.model(x, t).sample, t, x).prev_sample
        float(x.sum())

    def run(self, cmd: dict) -> None:
        if cmd["op"] == "train":
            self.train(int(cmd["batch"]))
        else:
            self.sample(int(cmd["batch"]), int(cmd["steps"]))

    def profile(self, cmd: dict) -> dict:
        """Per-op self CPU time of one call, grouped by torch.profiler (its table and the raw rows)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.run({**cmd, "op": cmd["kind"]})
        rows = [{"name": e.key, "self_cpu_us": e.self_cpu_time_total, "calls": e.count}
                for e in prof.key_averages()]
        with open(cmd["out"], "w", encoding="utf-8") as f:
            json.dump(rows, f)
        return {"ops": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--small", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    side = Side(args.folder, args.small)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in side.params)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "profile":
            print(json.dumps(side.profile(cmd)), flush=True)
            continue
        start = time.perf_counter()
        side.run(cmd)
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
