"""Training curves from runs' metrics.jsonl, as one PNG.

    python curves.py --runs runs/sft/seed0 runs/sft/seed1     -> runs/sft/seed0/curves.png
    python curves.py --runs runs/grpo/seed0 --out grpo.png

Design choices, and why:
- One panel per quantity that the given runs logged (loss; reward and its terms; success;
  latency; zero-variance groups; protocol), so the same command draws an SFT run (loss and
  its periodic held-out evaluation) and a GRPO run (rollout rewards too). Runs given
  together share each panel, labelled by folder name: seeds side by side.
- Rollout metrics of a GRPO step are noisy (a few groups per step): drawn faintly, with a
  moving average over --smooth steps on top. Held-out evaluations (eval_*) are drawn as
  points joined by lines: they are few and each is already a mean over many tasks.
- matplotlib is an optional extra (`pip install matplotlib`); without it this says so and
  exits, training never needs it.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cli

# (panel title, [(metric key, label)]): a panel is drawn when any run logged any of its keys
PANELS = [
    ("loss", [("loss", "training loss")]),
    ("reward", [("reward", "rollout reward")]),
    ("reward terms", []),   # every r_<term> key the runs logged
    ("success", [("success", "rollouts"), ("eval_success", "held-out eval")]),
    ("protocol", [("protocol", "rollouts"), ("eval_protocol", "held-out eval")]),
    ("latency (s)", [("latency", "rollouts"), ("eval_latency", "held-out eval")]),
    ("zero-variance groups", [("zero_variance_groups", "fraction of groups")]),
]


@dataclass
class CurvesConfig:
    runs: list[str] = cli.field([], "run folders to draw (or a checkpoint in one, its metrics.jsonl, "
                                "runs/<stage>/latest)", "input")
    out: str = cli.field("", "PNG to write (default: curves.png in the first run's folder)", "output")
    smooth: int = cli.field(10, "moving-average window over steps for per-step rollout metrics", "output")


def run_folder(given: str) -> Path:
    """The run folder behind what the user named: a run folder, its metrics.jsonl, a checkpoint
    inside it (runs/sft/R/checkpoints/step-N), or runs/<stage>/latest (a link to a checkpoint)."""
    path = Path(given).resolve()
    path = path.parent if path.is_file() else path
    for candidate in (path, *path.parents[:2]):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    raise cli.UsageError(f"{given}: no metrics.jsonl here (a run folder under runs/sft or runs/grpo, a checkpoint "
                         "in one, or runs/<stage>/latest was expected)")


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise cli.UsageError(f"{path}:{n}: not a JSON line") from None
    return [r for r in rows if "step" in r]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw(runs: dict[str, list[dict]], out: Path, smooth: int) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")   # files only, no display needed
    import matplotlib.pyplot as plt

    keys = {k for rows in runs.values() for r in rows for k in r}
    panels = []
    for title, wanted in PANELS:
        if title == "reward terms":
            wanted = [(k, k[2:]) for k in sorted(keys) if k.startswith("r_")]
        wanted = [(k, label) for k, label in wanted if k in keys]
        if wanted:
            panels.append((title, wanted))
    if not panels:
        raise cli.UsageError(f"the runs logged none of {', '.join(k for _, w in PANELS for k, _ in w)}")
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    for ax, (title, wanted) in zip(axes.flat, panels):
        for run_name, rows in runs.items():
            for key, label in wanted:
                steps, values = series(rows, key)
                if not steps:
                    continue
                name = f"{run_name}: {label}" if len(runs) > 1 or len(wanted) > 1 else run_name
                if key.startswith("eval_"):
                    ax.plot(steps, values, marker="o", label=name)
                elif len(steps) > smooth > 1:
                    line, = ax.plot(steps, values, alpha=0.25)
                    ax.plot(steps, moving_average(values, smooth), color=line.get_color(), label=name)
                else:
                    ax.plot(steps, values, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [title for title, _ in panels]


@cli.entry_point
def main(argv=None) -> int:
    config = cli.parse_config(CurvesConfig, argv, __doc__.splitlines()[0])
    cli.check(config.runs, "--runs: give at least one run folder, e.g. --runs runs/sft/seed0")
    cli.check(config.smooth >= 1, f"--smooth must be at least 1 (got {config.smooth})")
    folders = [run_folder(p) for p in config.runs]
    runs = {folder.name: read_metrics(folder) for folder in folders}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("curves.py draws with matplotlib, an optional extra: `pip install matplotlib`", file=sys.stderr)
        return 2
    out = Path(config.out) if config.out else folders[0] / "curves.png"
    panels = draw(runs, out, config.smooth)
    print(f"wrote {out} ({', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
