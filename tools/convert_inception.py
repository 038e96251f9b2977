"""Converts pytorch-fid's Inception weights (a PyTorch pickle) to the safetensors file that
`difftune fid` loads.

1. Download pytorch-fid's weights (the file its `fid_inception_v3()` fetches):
     https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
2. Convert them:
     source tools/setup.sh && python tools/convert_inception.py pt_inception-2015-12-05-6726825d.pth
   This writes ${DIFFTUNE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/difftune}/pt_inception-2015-12-05-6726825d.safetensors,
   where difftune looks by default (or pass `--out FILE` here and `--weights FILE` to difftune).

The tensors are stored unchanged (float32, all 566 keys including `num_batches_tracked` and the
`fc` classifier, which difftune ignores). The key set is checked against pytorch-fid's own
FID Inception, so a wrong file (e.g. torchvision's Inception) is refused.
"""
import argparse
import hashlib
import os
import sys
from unittest import mock

import torch
from safetensors.torch import save_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d"
# pytorch-fid's file name carries the first 8 hex digits of its SHA-256.
SHA256_PREFIX = "6726825d"


def default_out() -> str:
    cache = os.environ.get("DIFFTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "difftune"
    )
    return os.path.join(cache, WEIGHTS_NAME + ".safetensors")


def expected_shapes() -> dict:
    """Key -> shape of pytorch-fid's FID Inception, built without downloading anything."""
    import pytorch_fid.inception as pfi

    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=None), mock.patch.object(
        torch.nn.Module, "load_state_dict", lambda self, *args, **kwargs: None
    ):
        model = pfi.fid_inception_v3()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pth", help=f"{WEIGHTS_NAME}.pth downloaded from pytorch-fid's release")
    parser.add_argument("--out", default=default_out(), help="output safetensors (default: %(default)s)")
    args = parser.parse_args()

    with open(args.pth, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not digest.startswith(SHA256_PREFIX):
        print(f"warning: {args.pth} has SHA-256 {digest[:8]}..., not pytorch-fid's {SHA256_PREFIX}...", file=sys.stderr)

    state = torch.load(args.pth, map_location="cpu", weights_only=True)
    expected = expected_shapes()
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        sys.exit(f"{args.pth} is not pytorch-fid's FID Inception: missing {missing[:5]}, extra {extra[:5]}, "
                 f"wrong shapes {wrong[:5]}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"source": WEIGHTS_NAME + ".pth"})
    os.replace(tmp, args.out)
    print(f"wrote {len(state)} tensors to {args.out}")


if __name__ == "__main__":
    main()
