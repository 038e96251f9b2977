"""Builds the precision/recall parity fixture tests/fixtures/precision_recall/cases.json, for the
test in tests/fid_parity.rs.

The reference is `prdc` 0.2 (Naeem et al. 2020, NAVER), whose `compute_prdc` computes precision and
recall as Kynkäänniemi et al. 2019 define them: each set's manifold is the union of balls around its
feature vectors with the distance to the k-th nearest other vector of the set as radius (sklearn's
Euclidean `pairwise_distances`, `np.argpartition`); precision is the share of generated vectors
inside the reference manifold, recall the share of reference vectors inside the generated one.
prdc compares distances with `<` where the paper's code uses `<=`; on these continuous random
features no distance equals a radius, so both agree.

Cases (seeded numpy float64 features, rows are images): sets of different sizes and dimensions,
one generated set shifted and narrowed (lower recall), one widened (lower precision), k = 3 (the
paper's) and k = 5.

Usage: source tools/setup.sh && python tools/make_precision_recall_fixtures.py
"""
import json
import os

import numpy as np
from prdc import compute_prdc

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "precision_recall")


def case(name, rng, n_ref, n_gen, dims, shift, scale, k):
    reference = rng.standard_normal((n_ref, dims))
    generated = rng.standard_normal((n_gen, dims)) * scale + shift
    scores = compute_prdc(reference, generated, nearest_k=k)
    return dict(name=name, k=k, reference=reference.tolist(), generated=generated.tolist(),
                precision=float(scores["precision"]), recall=float(scores["recall"]))


def main():
    rng = np.random.default_rng(2019)
    cases = [
        case("same distribution", rng, 80, 60, 8, 0.0, 1.0, 3),
        case("shifted and narrowed", rng, 100, 70, 8, 0.2, 0.7, 3),
        case("widened", rng, 64, 90, 4, 0.0, 2.0, 3),
        case("k = 5", rng, 50, 50, 6, 0.3, 1.2, 5),
    ]
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(reference="prdc 0.2 compute_prdc", cases=cases), f)
    for c in cases:
        print(f"{c['name']}: precision {c['precision']:.4f}, recall {c['recall']:.4f}")


if __name__ == "__main__":
    main()
