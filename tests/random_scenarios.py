"""Random field-like scenarios, each with the verdicts its ground truth calls for.

A healthy warm-up, then two or three incidents, each one fault (a NAS slowing, a congested or lossy
fabric, a CPU-bound input pipeline with PSI, an input pipeline starving with no sign at all, a
checkpoint writing slowly): a slow NAS may predate the GPUs' drop by up to 15 s (the loaders'
prefetch), the agent may restart in the middle of any incident (its state file kept), and after each
incident the job recovers or another job with another natural level replaces it. Some incidents are
two faults overlapping (the first ends while the second goes on, the GPUs starved throughout), or
end in a partial recovery (the job back at 60-70% of its level while the fault goes on). The level
(0.5-1.0) and the per-second jitter are drawn too. Expected: the fault's cause within 4 s of the drop
(the second fault's within 6 s of the first's end), never a wrong infrastructure cause; nothing while
healthy; recovery within 12 s.
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
EVIDENT = [f for f in FAULTS if f[0] == "input_starved" and f[1] is not None]  # faults with a sign of their own
CAUSES = ("storage", "network", "host", "checkpoint")


def _step(gpu: str, seconds: int, level: float, noise: float, job: str, *conditions: tuple) -> str:
    extra = "".join(f'{key} = "{value}"\n' for key, value in conditions if key)
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
        kind = r.choice(["single", "single", "single", "overlap", "partial"])
        if kind == "overlap":
            t = _overlap(r, steps, expect, t, level, noise, job)
            t = _calm(r, steps, expect, t, level, noise, job)
            continue
        phase, key, value, cause = r.choice(FAULTS if kind == "single" else EVIDENT)
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
        if kind == "partial":  # back to 60-70% of the level, the fault still there: that cause or none
            part = r.randint(20, 60)
            steps.append(_step("saturated", part, round(level * r.choice([0.6, 0.65, 0.7]), 3), noise, job,
                               (key, value)))
            expect.append((t, t + part, None, 0, [c for c in CAUSES if c != cause]))
            t += part
            t = _calm(r, steps, expect, t, level, noise, job)
            continue
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
        text += f'\n[[expect]]\nfrom = {start}\nto = {end}\n'
        text += f'verdict = "{verdict}"\nwithin = {within}\n' if verdict else ""
        text += "never = [" + ", ".join(f'"{n}"' for n in never) + "]\n" if never else ""
    return text


def _overlap(r: random.Random, steps: list, expect: list, t: int, level: float, noise: float, job: str) -> int:
    """Two faults with signs of their own: the first alone, both, then the second alone."""
    first = r.choice(EVIDENT)
    second = r.choice([f for f in EVIDENT if f[1] != first[1]])
    alone, both, after = r.randint(15, 30), r.randint(10, 25), r.randint(20, 35)
    steps.append(_step("input_starved", alone, level, noise, job, first[1:3]))
    expect.append((t, t + alone, first[3], 4, WRONG[first[3]]))
    t += alone
    steps.append(_step("input_starved", both, level, noise, job, first[1:3], second[1:3]))
    expect.append((t, t + both, None, 0, [c for c in ("none", *CAUSES) if c not in (first[3], second[3])]))
    t += both
    steps.append(_step("input_starved", after, level, noise, job, second[1:3]))
    expect.append((t, t + after, second[3], 6, ["none", *(c for c in WRONG[second[3]] if c != first[3])]))
    return t + after


def _calm(r: random.Random, steps: list, expect: list, t: int, level: float, noise: float, job: str) -> int:
    calm = r.randint(30, 50)
    steps.append(_step("saturated", calm, level, noise, job))
    expect.append((t, t + calm, "none", 12, []))
    return t + calm
