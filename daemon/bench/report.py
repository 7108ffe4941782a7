"""The bench's tables on stdout and its plot: medians of the runs, per scenario."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .httpchat import HTTP_LABELS
from .measurement import KINDS, LABELS, SUMMARY_FIELDS, medians
from .scenarios import STALL_PARALLEL, STALL_STREAMS


def median_table(
    results: dict[str, dict[int, list[dict[str, Any]]]], streams: Sequence[int]
) -> list[dict[str, Any]]:
    """Per N: each system's medians over the runs, and the daemon's throughput ratios."""
    table = []
    for n in streams:
        row: dict[str, Any] = {"n": n}
        for kind, by_n in results.items():
            if by_n.get(n):
                row[kind] = medians(by_n[n], SUMMARY_FIELDS)
        daemon_tps = row["daemon"]["aggregate_tps"]
        for kind in ("inprocess", "llama_server"):
            if kind in row:
                row[f"daemon_over_{kind}"] = daemon_tps / row[kind]["aggregate_tps"]
        table.append(row)
    return table


def _cell(row: dict[str, Any], kind: str, key: str, spec: str = ".1f") -> str:
    return format(row[kind][key], spec) if kind in row else "-"


def _ratio(row: dict[str, Any], key: str) -> str:
    return format(row[key], ".3f") if key in row else "-"


def print_table(table: Sequence[dict[str, Any]]) -> None:
    print("aggregate tokens/s (medians)")
    print(
        f"{'N':>3} {'daemon':>8} {'in-proc':>8} {'llama-srv':>9} "
        f"{'d/in-proc':>9} {'d/llama-srv':>11}"
    )
    for row in table:
        print(
            f"{row['n']:>3} {_cell(row, 'daemon', 'aggregate_tps'):>8} "
            f"{_cell(row, 'inprocess', 'aggregate_tps'):>8} "
            f"{_cell(row, 'llama_server', 'aggregate_tps'):>9} "
            f"{_ratio(row, 'daemon_over_inprocess'):>9} "
            f"{_ratio(row, 'daemon_over_llama_server'):>11}"
        )
    print("\nlatency and fairness (medians): TTFT p50 / p99 ms, slowest/fastest stream rate")
    print(
        f"{'N':>3} {'system':<13} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'slow tok/s':>10} {'slow/fast':>9}"
    )
    for row in table:
        for kind in KINDS:
            if kind in row:
                print(
                    f"{row['n']:>3} {LABELS[kind]:<13} {_cell(row, kind, 'ttft_p50_ms'):>9} "
                    f"{_cell(row, kind, 'ttft_p99_ms'):>9} "
                    f"{_cell(row, kind, 'slowest_stream_tps'):>10} "
                    f"{_cell(row, kind, 'slowest_fastest_ratio', '.2f'):>9}"
                )


def print_stall(median: dict[str, float]) -> None:
    print(
        f"\nprefill stall ({STALL_STREAMS} streams, one {median['prompt_tokens']:.0f}-token "
        f"prompt, --parallel {STALL_PARALLEL}; medians): usual gap {median['median_gap_ms']:.1f} "
        f"ms, largest gap during the prefill {median['max_gap_during_prefill_ms']:.1f} ms, "
        f"ratio {median['ratio']:.2f} (target ≤ 3); prefill {median['prefill_ms']:.0f} ms"
    )


def require_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(table: Sequence[dict[str, Any]], path: Path) -> None:
    """Two panels against N: aggregate tokens/s and TTFT p50, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in KINDS:
        rows = [row for row in table if kind in row]
        if not rows:
            continue
        ns = [row["n"] for row in rows]
        left.plot(ns, [r[kind]["aggregate_tps"] for r in rows], marker="o", label=LABELS[kind])
        right.plot(ns, [r[kind]["ttft_p50_ms"] for r in rows], marker="o", label=LABELS[kind])
    for axis, title, unit in (
        (left, "aggregate throughput", "tokens/s"),
        (right, "time to first token (p50)", "ms"),
    ):
        axis.set_title(title)
        axis.set_xlabel("concurrent streams N")
        axis.set_ylabel(unit)
        axis.set_xticks([row["n"] for row in table])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_prefix(median: dict[str, float]) -> None:
    print(
        f"\nshared system prompt ({median['prompt_tokens_without']:.0f} prompt tokens; medians): "
        f"first token {median['ttft_without_ms']:.0f} ms for a new system prompt, "
        f"{median['ttft_with_ms']:.0f} ms for a second session with it "
        f"({median['cached_tokens_with']:.0f} tokens restored): {median['speedup']:.1f}x"
    )


def print_sessions(result: dict[str, float]) -> None:
    print(
        f"\n{result['sessions']:.0f} sessions on 4 slots, --session-cache-mb "
        f"{result['session_cache_mb']:.0f}: engine RSS {result['engine_rss_before_mb']:.0f} MB "
        f"before, {result['engine_rss_after_mb']:.0f} MB after; the first session, its state "
        f"dropped, answers again in {result['first_session_back_ttft_ms']:.0f} ms "
        f"(rebuilt from its history)"
    )


def print_speculation(table: dict[str, Any]) -> None:
    print("\nn-gram speculation in-process (one draft token per row; medians):")
    print(f"{'N':>3} {'plain':>7} {'matched':>8} {'accept':>7} {'every row':>10} {'accept':>7}")
    for n, row in table.items():
        matched, every = row["matched_rows"], row["every_row"]
        print(
            f"{n:>3} {row['plain']['aggregate_tps']:>7.1f} {matched['over_plain']:>7.3f}x "
            f"{matched['acceptance']:>7.2f} {every['over_plain']:>9.3f}x "
            f"{every['acceptance']:>7.2f}"
        )


def print_rows(rows: dict[int, float]) -> None:
    print(
        "\ndecode step of N rows alone, in-process (ms): "
        + ", ".join(f"{n}: {ms:.1f}" for n, ms in rows.items())
    )


def print_sampling(sampling: dict[str, Any]) -> None:
    rows = sampling["rows"]
    print(f"\nsampling {rows} rows after each decode in-process, the chains handed (medians, ms):")
    for way, ms in sampling.items():
        if isinstance(ms, dict):
            print(f"  {way}: sampling {ms['sampling_ms']:.2f}, whole step {ms['step_ms']:.2f}")


def print_chat(chat: dict[str, Any]) -> None:
    print(
        f"\nmulti-turn chat ({chat['conversations']} conversations at once x {chat['turns']} "
        f"turns, {chat['reply_tokens']} tokens a reply at temp 0, "
        f"{chat['daemon_prompt_tokens_per_turn']:.0f} new prompt tokens a turn; medians):"
    )
    print(f"{'system':<13} {'slots':>5} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p90':>9}")
    for row in chat["median"]:
        print(
            f"{LABELS[row['system']]:<13} {row['slots']:>5} {row['generated_tps']:>9.1f} "
            f"{row['ttft_p50_ms']:>9.0f} {row['ttft_p90_ms']:>9.0f}"
        )


def print_http_chat(result: dict[str, Any]) -> None:
    print(
        f"\nchat over HTTP ({result['streams']} streaming chat completions at once, "
        f"{result['tokens']} tokens each; medians):"
    )
    print(f"{'system':<14} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'slow tok/s':>10}")
    for system, row in result["median"].items():
        print(
            f"{HTTP_LABELS[system]:<14} {row['aggregate_tps']:>9.1f} {row['ttft_p50_ms']:>9.0f} "
            f"{row['ttft_p99_ms']:>9.0f} {row['slowest_stream_tps']:>10.1f}"
        )
    for name, value in result["ratios"].items():
        of_medians = result["ratios_of_medians"][name]
        print(f"{name}: {value:.3f} (median of the runs' ratios; of the medians {of_medians:.3f})")
    grammar = result["grammar"]
    print(
        f"grammar: {grammar['streams']} streams; the others' rate "
        f"{grammar['plain_stream_tps']:.1f} tok/s each when all are plain, "
        f"{grammar['others_with_one_constrained_tps']:.1f} with one constrained by a JSON schema "
        f"(ratio {grammar['others_ratio']:.3f}); the constrained one "
        f"{grammar['constrained_stream_tps']:.1f}"
    )
