"""Discovery: find a model's shortcuts when nobody has masks (SpRAy clusters, candidate regions with a
causal test against a control, global probes) and propose masks and a repair. See runner.py."""

from .probes import PROBES, run_probes
from .regions import box_iou
from .runner import (
           NO_SHORTCUT,
           SCHEMA,
           SHORTCUT_FOUND,
           DiscoveryConfig,
           DiscoveryReport,
           proposed_dataset,
           run_discovery,
)
from .spray import Cluster, eigengap_count, strategy_clusters

__all__ = ["NO_SHORTCUT", "PROBES", "SCHEMA", "SHORTCUT_FOUND", "Cluster", "DiscoveryConfig", "DiscoveryReport",
           "box_iou", "eigengap_count", "proposed_dataset", "run_discovery", "run_probes", "strategy_clusters"]
