"""Draw docs/masks.png: which keys each query sees for band and chunked masks (from the package's
own mask definition, pyencoder.IntervalMask)."""
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pyencoder import IntervalMask  # noqa: E402


def main():
    n = 24
    cases = [("band(None, 0): causal", IntervalMask.band(None, 0)),
             ("band(6, 2): 2 frames lookahead", IntervalMask.band(6, 2)),
             ("chunked(4, 1, lookahead=0)", IntervalMask.chunked(4, 1, 0)),
             ("chunked(4, 1, lookahead=3)", IntervalMask.chunked(4, 1, 3))]
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4.2))
    for ax, (title, prm) in zip(axes, cases):
        ax.imshow(prm.dense(n, n).float(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position s")
        ax.set_ylabel("query position p")
        ax.set_xticks(range(0, n, 4))
        ax.set_yticks(range(0, n, 4))
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "masks.png")
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
