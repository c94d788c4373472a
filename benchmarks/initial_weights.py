"""Every method's initial weights for seed 0, dumped so that two trees can be compared bit for bit: a refactor must
not change them (issue 33). Run once per tree, then compare:

    git worktree add /tmp/old <commit>
    (cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/benchmarks/initial_weights.py dump /tmp/old.pt)
    python benchmarks/initial_weights.py dump /tmp/new.pt
    python benchmarks/initial_weights.py compare /tmp/old.pt /tmp/new.pt
"""

from __future__ import annotations

import sys

import torch

ENC = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
DEC = ["mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]
TOK = ["tokenizer.kind=random", "tokenizer.vocab_size=32", "tokenizer.hidden=8", "tokenizer.code_dim=8",
       "tokenizer.downsample=2"]  # fmt: skip
# written as the configs of the oldest tree compared would take them (no registry there): each method's own keys only
RUNS = {"mae": DEC, "emae": ["method=emae", *DEC], "bootmae": ["method=bootmae", *DEC],
        "bootmae+parallel": ["method=bootmae", "mask.type=parallel", *DEC], "mae+parallel": ["mask.type=parallel", *DEC],
        "mae+crossmae": [*DEC, "mae.decoder=crossmae", "mae.decoder_context_blocks=all", "mae.reconstruct_ratio=0.5"],
        "simmim": ["method=simmim", "simmim.mask_patch_size=8"], "beit": ["method=beit", *TOK],
        "mcbeit": ["method=mcbeit", *TOK], "mae-base": ["model.arch=vit_base_patch16_224"]}  # fmt: skip


def dump(path: str) -> None:
    from mimkit.config import load_config
    from mimkit.methods import build_model

    out = {}
    for name, extra in RUNS.items():
        torch.manual_seed(0)
        cfg = load_config(None, (ENC if name != "mae-base" else []) + extra)
        out[name] = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    torch.save(out, path)


def compare(old_path: str, new_path: str) -> int:
    old, new = torch.load(old_path), torch.load(new_path)
    print("| run | tensors | same keys | bit-identical |\n|---|---|---|---|")
    bad = 0
    for name in old:
        a, b = old[name], new.get(name, {})
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        bad += not same
        print(f"| {name} | {len(a)} | {a.keys() == b.keys()} | {same} |")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"] and len(sys.argv) == 3:
        dump(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
