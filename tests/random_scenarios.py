"""Random field-like scenarios, each with the verdicts its ground truth calls for.

A healthy warm-up, then two or three incidents, each one fault (a NAS slowing, a congested or lossy
fabric, a CPU-bound input pipeline with PSI, an input pipeline starving with no sign at all, a
checkpoint writing slowly): a slow NAS may predate the GPUs' drop by up to 15 s (the loaders'
prefetch), the agent may restart in the middle of any incident (its state file kept), and after each
incident the job recovers or another job with another natural level replaces it. The level (0.5-1.0)
and the per-second jitter are drawn too. Expected: the fault's cause within 4 s of the drop, never a
wrong infrastructure cause; nothing while healthy; recovery within 12 s.
"""

from __future__ import annotations

import random

FAULTS = (  # GPU phase, condition, its value, the cause it calls for
    ("input_starved", "storage", "slow-read", "storage"),
    ("input_starved", "network", "congested", "network"),
    ("input_starved", "network", "lossy", "network"),
    ("input_starved", "host", "cpu-bound", "host"),
    ("input_starved", None, None, "host"),
    ("checkpoint", "storage", "slow-write", "checkpoint"),
)
WRONG = {"storage": ["network", "checkpoint"], "network": ["storage", "checkpoint"],
         "host": ["network", "storage", "checkpoint"], "checkpoint": ["network", "storage", "host"]}


def _step(gpu: str, seconds: int, level: float, noise: float, job: str, condition: tuple | None = None) -> str:
    extra = f'{condition[0]} = "{condition[1]}"\n' if condition and condition[0] else ""
    return (f'[[steps]]\ngpu = "{gpu}"\nseconds = {seconds}\nlevel = {level}\nnoise = {noise}\n'
            f'job = "{job}"\n{extra}')


def scenario(seed: int) -> str:
    """The TOML text of random scenario `seed` (docs/SCENARIOS.md)."""
    r = random.Random(seed)
    noise, level, job = r.choice([0.0, 0.05, 0.1]), r.choice([1.0, 0.7, 0.5]), "j0"
    steps, expect, restarts, t = [], [], [], 0
    head = r.randint(20, 40)
    steps.append(_step("saturated", head, level, noise, job))
    expect.append((0, head, "none", 0, []))
    t = head
    for i in range(r.randint(2, 3)):
        phase, key, value, cause = r.choice(FAULTS)
        lead = r.choice([0, 0, 3, 8, 15]) if key == "storage" and phase == "input_starved" else 0
        if lead:
            steps.append(_step("saturated", lead, level, noise, job, (key, value)))
            expect.append((t, t + lead, "none", 0, []))
            t += lead
        seconds = r.randint(20, 45)
        steps.append(_step(phase, seconds, level, noise, job, (key, value)))
        expect.append((t, t + seconds, cause, 4, WRONG[cause]))
        if r.random() < 0.4:
            restarts.append(t + r.randint(5, seconds - 5) + 0.5)
        t += seconds
        calm = r.randint(30, 50)
        if r.random() < 0.4:  # the job ends; another, with its own level, starts
            steps.append(_step("idle", 5, level, noise, ""))
            t += 5
            job, level = f"j{i + 1}", r.choice([1.0, 0.8, 0.6, 0.55])
            steps.append(_step("saturated", calm, level, noise, job))
            expect.append((t, t + calm, "none", 0, []))
        else:
            steps.append(_step("saturated", calm, level, noise, job))
            expect.append((t, t + calm, "none", 12, []))
        t += calm
    text = f'description = "random {seed}: level {level}, jitter {noise}"\n'
    text += f"restarts = {restarts}\n\n" if restarts else "\n"
    text += "\n".join(steps)
    for start, end, verdict, within, never in expect:
        text += f'\n[[expect]]\nfrom = {start}\nto = {end}\nverdict = "{verdict}"\nwithin = {within}\n'
        text += "never = [" + ", ".join(f'"{n}"' for n in never) + "]\n" if never else ""
    return text
