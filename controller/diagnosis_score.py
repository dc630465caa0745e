"""Confusion matrix of injected faults against the gateway's diagnoses (for bench/).

Kept apart from the diagnoser so a benchmark can score a recorded run (alarm events
read back from a record file) without building a site.
"""
from __future__ import annotations

from collections.abc import Iterable

_CODE_RANK = ("cluster.offline", "cluster.subscription_expired", "cluster.power_loss",
              "cluster.surge_protector_tripped", "cluster.amplifier_fault",
              "cluster.speaker_line_fault")


def score(injected: Iterable[tuple[str, str]], alarms: Iterable[dict]) -> dict:
    """Confusion matrix of injected (cluster, cause) against diagnosed alarms.

    ``alarms``: alarm objects in the order seen (events or the active list); the last
    version of each alarm_id wins, so a cleared link outage counts as `link_loss`. A
    cluster's diagnosis is its most confident cluster alarm (subscription *expiring*
    reminders are not diagnoses). Clusters with no injected fault are "none".
    """
    truth = dict(injected)
    latest: dict[str, dict] = {}
    for a in alarms:
        latest[a["alarm_id"]] = a
    best: dict[str, dict] = {}
    for a in latest.values():
        cid, code = a.get("cluster_id"), a.get("code")
        if cid is None or code not in _CODE_RANK:
            continue
        rank = (a.get("confidence", 0), -_CODE_RANK.index(code))
        b = best.get(cid)
        if b is None or rank > (b.get("confidence", 0), -_CODE_RANK.index(b["code"])):
            best[cid] = a
    pred = {cid: a["cause"] for cid, a in best.items()}
    matrix: dict[str, dict[str, int]] = {}
    for cid in sorted(set(truth) | set(pred)):
        t, p = truth.get(cid, "none"), pred.get(cid, "none")
        matrix.setdefault(t, {}).setdefault(p, 0)
        matrix[t][p] += 1
    causes = sorted({*truth.values(), *pred.values()})
    per_cause = {}
    for k in causes:
        tp = matrix.get(k, {}).get(k, 0)
        n_pred = sum(row.get(k, 0) for row in matrix.values())
        n_true = sum(matrix.get(k, {}).values())
        per_cause[k] = {"precision": tp / n_pred if n_pred else None,
                        "recall": tp / n_true if n_true else None}
    correct = sum(1 for cid, t in truth.items() if pred.get(cid) == t)
    return {
        "matrix": matrix, "per_cause": per_cause, "n_injected": len(truth), "correct": correct,
        "accuracy": correct / len(truth) if truth else None,
        "missed": sorted(cid for cid in truth if cid not in pred),
        "false_alarms": sorted(cid for cid in pred if cid not in truth),
        "wrong": [{"cluster": cid, "injected": t, "diagnosed": pred[cid]}
                  for cid, t in sorted(truth.items()) if cid in pred and pred[cid] != t],
    }
