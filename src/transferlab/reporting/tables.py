"""The comparison table as people read it: comparison.md, the report and the terminal share it."""

from __future__ import annotations


def format_accuracy(row: dict, split: str = "test") -> str:
    """"99.35% [98.7, 99.8]" for one run (95% bootstrap CI), "99.35% ± 0.21 (n=3)" for repeats."""
    value = row.get(f"{split}_accuracy")
    if value is None:
        return "–"
    if row.get(f"{split}_accuracy_std") is not None:
        return f"{value:.2%} ± {100 * row[f'{split}_accuracy_std']:.2f} (n={row['runs']})"
    if split == "test" and row.get("test_ci_low") is not None:
        return f"{value:.2%} [{100 * row['test_ci_low']:.1f}, {100 * row['test_ci_high']:.1f}]"
    return f"{value:.2%}"


def format_row(row: dict) -> dict:
    """The comparison's columns as people read them (comparison.md and the report)."""
    def number(value, pattern):
        return "–" if value is None else pattern.format(value)

    return {
        "strategy": row["strategy"], "backbone": row["backbone"], "weights": row["weights"] or "–",
        "epochs": number(row["epochs"], "{:.0f}"), "train loss": number(row["train_loss"], "{:.4f}"),
        "val loss": number(row["val_loss"], "{:.4f}"), "val accuracy": format_accuracy(row, "val"),
        "test accuracy (95% CI)": format_accuracy(row, "test"),
        "params (trainable / total)": "–" if row["params_total"] is None else
        f"{row['params_trainable']:,.0f} / {row['params_total']:,.0f}",
        "wall time (s)": number(row["wall_s"], "{:.1f}"),
        "images/s": "–" if row["images_per_s"] is None else f"{row['images_per_s']:.1f} ({row['speed_of']})",
        **({"error": row["error"]} if row.get("error") else {}),
    }


def markdown_table(rows: list[dict]) -> str:
    formatted = [format_row(row) for row in rows]
    columns = list(dict.fromkeys(key for row in formatted for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in formatted:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"
