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
