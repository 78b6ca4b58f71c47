"""EventBridge contracts: the EC2 events trainctl reacts to.

Handlers parse with these models (Powertools Parser), the CDK stack builds its rule
patterns from these constants, and tests feed real event JSON through both.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field

EC2_SOURCE = "aws.ec2"
SPOT_INTERRUPTION_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE_RECOMMENDATION = "EC2 Instance Rebalance Recommendation"
INSTANCE_STATE_CHANGE = "EC2 Instance State-change Notification"

# Only these states mean "the instance is going away"; pending/running/stopping/stopped are
# not losses (a stop without a Spot warning is the user's own doing).
LOSS_STATES: tuple[str, ...] = ("shutting-down", "terminated")

INSTANCE_ID_PATTERN = r"^i-[0-9a-f]{8,17}$"


class SpotInterruptionDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    instance_id: str = Field(alias="instance-id", pattern=INSTANCE_ID_PATTERN)
    instance_action: Literal["terminate", "stop", "hibernate"] = Field(alias="instance-action")


class RebalanceDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    instance_id: str = Field(alias="instance-id", pattern=INSTANCE_ID_PATTERN)


class StateChangeDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    instance_id: str = Field(alias="instance-id", pattern=INSTANCE_ID_PATTERN)
    state: Literal["pending", "running", "shutting-down", "terminated", "stopping", "stopped"]


class SpotInterruptionEvent(EventBridgeModel):
    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 Spot Instance Interruption Warning"] = Field(alias="detail-type")
    detail: SpotInterruptionDetail

    def deadline(self, notice_seconds: int) -> datetime:
        """When EC2 reclaims the instance: the notice period after the warning."""
        return self.time + timedelta(seconds=notice_seconds)


class RebalanceEvent(EventBridgeModel):
    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 Instance Rebalance Recommendation"] = Field(alias="detail-type")
    detail: RebalanceDetail


class StateChangeEvent(EventBridgeModel):
    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 Instance State-change Notification"] = Field(alias="detail-type")
    detail: StateChangeDetail

    @property
    def is_loss(self) -> bool:
        return self.detail.state in LOSS_STATES


def rule_patterns() -> dict[str, dict[str, object]]:
    """The EventBridge patterns the stack deploys, keyed by a stable rule id.

    The state-change rule narrows to loss states so the handler is not invoked for every
    instance launch in the account.
    """
    return {
        "SpotInterruptionWarning": {
            "source": [EC2_SOURCE],
            "detail-type": [SPOT_INTERRUPTION_WARNING],
        },
        "RebalanceRecommendation": {
            "source": [EC2_SOURCE],
            "detail-type": [REBALANCE_RECOMMENDATION],
        },
        "InstanceStateChange": {
            "source": [EC2_SOURCE],
            "detail-type": [INSTANCE_STATE_CHANGE],
            "detail": {"state": list(LOSS_STATES)},
        },
    }
