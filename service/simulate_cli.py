"""``workerlease simulate`` and ``workerlease simulate generate`` (see ``service.simulate``)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import click

from service.config import ConfigError, load_config

if TYPE_CHECKING:
    from service.simulate import Result

# service.simulate is imported when a command runs: it loads the passes and a
# provisioner, which no other command needs.
SHAPES = ("steady", "business-day", "bursty")


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True))
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--policy",
    default="config",
    show_default=True,
    help="fixed:N (N ready in every pool), adaptive (every pool), or config (as configured)",
)
@click.option("--seed", default=0, show_default=True, help="seed of the simulated provisioner")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def simulate_command(
    ctx: click.Context,
    config_path: str | None,
    trace_path: str | None,
    policy: str,
    seed: int,
    as_json: bool,
) -> None:
    """Replay a trace of lease requests against the real scheduler code, on a virtual clock."""
    if ctx.invoked_subcommand is not None:
        return
    if not config_path or not trace_path:
        raise click.UsageError("--config and --trace are required (or: simulate generate ...)")
    from service.simulate import SimulationError, read_trace, simulate

    try:
        config = load_config(config_path, environ={})
        trace = read_trace(trace_path)
        started = time.perf_counter()
        result = simulate(config, trace, policy=policy, seed=seed)
    except (ConfigError, SimulationError) as exc:
        raise click.ClickException(str(exc)) from None
    elapsed = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "elapsed_s": round(elapsed, 2)}, indent=2))
    else:
        click.echo(render(result, elapsed))


@simulate_command.command("generate")
@click.option("--shape", type=click.Choice(SHAPES), required=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--pool", "pool", required=True)
@click.option("--rate", "rate", default=1.0, show_default=True, help="requests per minute at peak")
@click.option("--hours", default=24.0, show_default=True)
@click.option("--hold", "hold", default=600.0, show_default=True, help="median hold, seconds")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True)
def generate_command(
    shape: str, seed: int, pool: str, rate: float, hours: float, hold: float, out: str
) -> None:
    """Write a synthetic trace (CSV: time,tenant,pool,hold_seconds)."""
    from service.simulate import generate, write_trace

    count = write_trace(generate(shape, seed, pool, rate, hours, hold), out)
    click.echo(f"wrote {count} requests over {hours:g} h to {out}")


@simulate_command.command("compare")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, exists=True), required=True
)
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, exists=True), required=True)
@click.option("--pool", "pool", required=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def compare_command(config_path: str, trace_path: str, pool: str, seed: int, as_json: bool) -> None:
    """Adaptive against the best fixed min_ready (the smallest with the best p95 wait)."""
    from dataclasses import asdict

    from service.simulate import SimulationError, compare, read_trace

    try:
        config = load_config(config_path, environ={})
        started = time.perf_counter()
        result = compare(config, read_trace(trace_path), pool, seed)
    except (ConfigError, SimulationError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        body = {
            "pool": pool,
            "adaptive": asdict(result.adaptive),
            "best_fixed": result.best_fixed,
            "fixed": {n: asdict(r) for n, r in result.tried.items()},
            "idle_saved": result.idle_saved,
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        click.echo(json.dumps(body, indent=2))
        return
    click.echo("policy | warm hit | wait p95 s | wait p99 s | idle worker-min | worker-min")
    rows = [("adaptive", result.adaptive)] + [(f"fixed:{n}", r) for n, r in result.tried.items()]
    for name, r in rows:
        click.echo(
            f"{name} | {r.warm_hit_rate:.1%} | {r.wait_p95_s:.1f} | {r.wait_p99_s:.1f} | "
            f"{r.idle_worker_minutes:.0f} | {r.worker_minutes:.0f}"
        )
    click.echo(
        f"best fixed: {result.best_fixed}; adaptive idle worker-minutes "
        f"{-result.idle_saved:+.0%} against it ({time.perf_counter() - started:.0f} s)"
    )


def render(result: Result, elapsed: float) -> str:
    lines = [
        f"policy {result.policy}, seed {result.seed}: {result.simulated_hours:g} simulated hours "
        f"in {elapsed:.1f} s ({result.events} events, {result.passes} scheduler passes)",
        "pool | leases | warm hit | wait p50 / p95 / p99 / max s | idle worker-min | "
        "worker-min | creations | cost",
    ]
    for name, pool in result.pools.items():
        cost = "" if pool.cost is None else f"{pool.cost:.2f}"
        lines.append(
            f"{name} | {pool.leases} | {pool.warm_hit_rate:.1%} | {pool.wait_p50_s:.1f} / "
            f"{pool.wait_p95_s:.1f} / {pool.wait_p99_s:.1f} / {pool.wait_max_s:.1f} | "
            f"{pool.idle_worker_minutes:.0f} | {pool.worker_minutes:.0f} | {pool.creations} | "
            f"{cost}"
        )
    return "\n".join(lines)
