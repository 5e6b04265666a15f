"""Speed and memory of `keras_ee.interop` on a large authors' checkpoint.

    PYTHONPATH=. .venv/bin/python bench/import.py CHECKPOINT [--preset msdnet_imagenet_s7]

CHECKPOINT is made locally (not committed) by the authors' own code with random weights, e.g.
kalviny/MSDNet-PyTorch's `MSDNet(args)` for ImageNet step 7 (`--nBlocks 5 --stepmode even
--step 7 --base 4 --nChannels 32 --growthRate 16 --grFactor 1-2-4-4 --bnFactor 1-2-4-4`,
47,544,824 parameters) saved with `torch.save({'state_dict': DataParallel(model).state_dict(),
...})`. Reported:

- the time to read the file's bytes (`Path.read_bytes`, warm page cache, best of 3);
- the Keras model's build time (apart: it does not depend on the checkpoint);
- the time to read the checkpoint and map its tensors into the built model
  (`import_torch_checkpoint(path, model=built)`, best of `--repeat`), and its ratio to the
  byte read (target <= 2x);
- the extra peak memory of that import: the process's peak RSS after it minus the RSS before
  (the model already built), against the checkpoint's size (target <= 2.5x);
- where the time goes, each part timed alone (best of `--repeat`): reading the file and parsing
  it into views of its bytes (`torch_file.read_checkpoint`), the sha256 and the zip members'
  CRC-32 (`FileChecks`, a thread that runs while the tensors are mapped; into a model the caller
  gives, it is waited for before anything is written), checking the mapping
  (`torch_import.plan_fill`) and writing the variables (`torch_import.apply_fill`).
"""

import argparse
import os
import resource
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--preset", default="msdnet_imagenet_s7")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from keras_ee import models
    from keras_ee.interop import import_torch_checkpoint

    size = args.checkpoint.stat().st_size
    t = time.perf_counter()
    model = models.create(args.preset)
    build = time.perf_counter() - t
    import gc

    gc.collect()
    before = rss_bytes()
    t = time.perf_counter()
    _, report = import_torch_checkpoint(args.checkpoint, model=model)
    first = time.perf_counter() - t
    peak = peak_rss_bytes() - before
    times = [first]
    for _ in range(args.repeat - 1):
        gc.collect()
        t = time.perf_counter()
        import_torch_checkpoint(args.checkpoint, model=model)
        times.append(time.perf_counter() - t)
    reads = []
    for _ in range(3):
        t = time.perf_counter()
        data = args.checkpoint.read_bytes()
        reads.append(time.perf_counter() - t)
        del data
    read = min(reads)
    mapped = min(times)
    print(
        f"checkpoint: {args.checkpoint} ({size / 1e6:.1f} MB, {report.serialisation}, {report.tensors_total} tensors)"
    )
    print(f"Keras model build ({args.preset}): {build:.2f} s (apart)")
    print(f"read the file's bytes: {read:.3f} s")
    print(f"read + map into the model: {mapped:.3f} s = {mapped / read:.2f}x the byte read (target <= 2x)")
    print(f"extra peak memory of the import: {peak / 1e6:.0f} MB = {peak / size:.2f}x the checkpoint (target <= 2.5x)")
    print("parts, each alone:")
    for name, seconds in breakdown(args.checkpoint, model, args.repeat).items():
        print(f"  {name}: {seconds:.3f} s")


def breakdown(path, model, repeat):
    """Best-of-`repeat` seconds of each part of an import into `model` (see the module docstring)."""
    import gc

    from keras_ee.interop import torch_file, torch_import

    parts = {}

    def timed(name, fn, after=None):
        best, out = None, None
        for _ in range(repeat):
            gc.collect()
            t = time.perf_counter()
            out = fn()
            spent = time.perf_counter() - t
            best = spent if best is None else min(best, spent)
            if after is not None:
                after(out)  # untimed: the next try starts alone
        parts[name] = best
        return out

    obj, _, checks = timed(
        "read the file and parse it (views of its bytes)",
        lambda: torch_file.read_checkpoint(path),
        after=lambda out: out[2].sha256(),
    )
    data = file_bytes(path)
    timed("sha256 + zip CRC-32s (FileChecks, alone)", lambda: torch_file.FileChecks(data, checks.members).sha256())
    sd = torch_import.StateDict(torch_import.strip_module_prefix(torch_import.unwrap_checkpoint(obj)[0])[0])
    assignments = torch_import.msdnet_assignments(sd)
    plan = timed("check the mapping (plan_fill)", lambda: torch_import.plan_fill(model, sd, assignments, "model")[0])
    timed("write the variables (apply_fill)", lambda: torch_import.apply_fill(plan))
    return parts


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main()
