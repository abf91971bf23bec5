"""Plot mean reward per GRPO step (and a moving average) from a run's metrics.jsonl.

    python docs/perf/grpo-plot.py RUN/metrics.jsonl docs/perf/grpo-arithmetic-cpu.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WINDOW = 5


def main(metrics_path: str, png_path: str) -> None:
    rows = [json.loads(line) for line in open(metrics_path)]
    steps = [r["step"] for r in rows]
    reward = [r["reward"] for r in rows]
    kl = [r["kl"] for r in rows]
    average = [sum(reward[max(0, i - WINDOW + 1):i + 1]) / len(reward[max(0, i - WINDOW + 1):i + 1])
               for i in range(len(reward))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, "o-", color="tab:blue", alpha=0.45, label="mean reward of the step (32 replies)")
    ax.plot(steps, average, "-", color="tab:blue", linewidth=2.5, label=f"moving average ({WINDOW} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (first number is the sum)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(steps, kl, "--", color="tab:red", alpha=0.7, label="KL to the reference")
    right.set_ylabel("KL per token (k3)", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper left", fontsize=8)
    ax.set_title("GRPO on arithmetic: SmolLM2-135M-Instruct, LoRA r16, 2-core CPU")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
