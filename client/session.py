"""What one message of one silo works with: its settings, node, state, data and model."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context

from client.durable import SiloStore
from common import records
from common.config import AppConfig, NodeConfig
from common.data.silo import SiloData
from common.models import Recommender


@dataclass(slots=True)
class Session:
    """Everything one message of one silo works with."""

    cfg: AppConfig
    node: NodeConfig
    context: Context
    config: ConfigRecord  # the server's instructions for this message
    data: SiloData
    model: Recommender
    store: SiloStore | None

    @property
    def partition_id(self) -> int:
        return self.node.partition_id

    @property
    def server_round(self) -> int:
        return int(self.config[records.SERVER_ROUND])  # type: ignore[arg-type]

    def held_by_server(self) -> int:
        """Ledger lines of this silo the server says it holds (0 when it does not say)."""
        counts = self.config.get(records.LEDGER_COUNTS, [])
        assert isinstance(counts, list)
        return int(counts[self.partition_id]) if self.partition_id < len(counts) else 0
