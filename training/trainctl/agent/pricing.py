"""What this instance costs while it runs: the prices behind the agent's cost accrual.

* **Spot**: the price in force for the instance's type and zone
  (`ec2:DescribeSpotPriceHistory`, which also returns the entry in force at the window's
  start), integrated piecewise over the window by the same arithmetic `trainctl savings`
  uses (`trainctl.commands.costs.spot_cost`). Fetched once and refreshed hourly: Spot
  prices move slowly, and one call an hour per instance stays far below the API's limits.
* **On-demand**: the bundled list-price table (`trainctl.commands.costs`). It holds
  us-east-1 prices only, so in another region the on-demand price is unknown.

Type, zone and market come from IMDS (`instance-type`, `placement/availability-zone`,
`instance-life-cycle`). A price that cannot be known (IMDS silent, a type missing from
the table, no history, the API refused) is logged once per cause and the window is left
unpriced (`cost` returns None): the caller keeps its accrual mark, so when a later call
can price it the whole window since the mark is accrued then. Nothing is guessed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from trainctl.agent.imds import ImdsUnavailable, InstancePlacement
from trainctl.commands.costs import (
    ON_DEMAND_TABLE_REGION,
    CostError,
    PricePoint,
    UnknownInstanceType,
    on_demand_rate,
    spot_cost,
)

logger = logging.getLogger("trainctl.agent.pricing")

# The product descriptions a Linux instance in a VPC is billed under (both are reported).
LINUX_PRODUCTS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")
SPOT = "spot"
ON_DEMAND = "on-demand"


class PlacementSource(Protocol):
    def placement(self) -> InstancePlacement | None: ...


class InstancePrices:
    """`cost(start, end)`: USD this instance costs over the window, or None if unknown.

    `ec2` is an injected boto3 EC2 client (the agent's instance role needs
    `ec2:DescribeSpotPriceHistory`); `imds` says what the instance is; `region` is the
    instance's region (the on-demand table is only valid in its own).
    """

    def __init__(
        self,
        ec2: Any,
        imds: PlacementSource,
        *,
        region: str | None,
        refresh_seconds: float = 3600.0,
        retry_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ec2 = ec2
        self._imds = imds
        self._region = region
        self._refresh_seconds = refresh_seconds
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._placement: InstancePlacement | None = None
        self._history: list[PricePoint] | None = None
        self._fetched_at = 0.0
        self._failed_at = float("-inf")
        self._logged: set[str] = set()

    def cost(self, start: datetime, end: datetime) -> float | None:
        if end <= start:
            return 0.0
        with self._lock:
            placement = self._placement or self._read_placement()
            if placement is None:
                return None
            if placement.life_cycle == ON_DEMAND:
                return self._on_demand(placement, start, end)
            if placement.life_cycle == SPOT:
                return self._spot(placement, start, end)
            self._unknown(
                f"life-cycle:{placement.life_cycle}",
                f"instance-life-cycle {placement.life_cycle!r} has no price here",
            )
            return None

    # --- what the instance is ---------------------------------------------------------------

    def _read_placement(self) -> InstancePlacement | None:
        try:
            placement = self._imds.placement()
        except ImdsUnavailable as exc:
            self._unknown("imds", f"IMDS unavailable ({exc})")
            return None
        if placement is None:
            self._unknown("imds", "IMDS names no instance type, zone or instance-life-cycle")
            return None
        self._placement = placement
        logger.info(
            "pricing this instance as %s %s in %s",
            placement.life_cycle,
            placement.instance_type,
            placement.zone,
        )
        return placement

    # --- on-demand --------------------------------------------------------------------------

    def _on_demand(self, placement: InstancePlacement, start: datetime, end: datetime) -> float | None:
        if self._region != ON_DEMAND_TABLE_REGION:
            self._unknown(
                "on-demand-region",
                f"the bundled on-demand prices are {ON_DEMAND_TABLE_REGION} list prices, "
                f"this instance runs in {self._region or 'an unknown region'}",
            )
            return None
        try:
            rate = on_demand_rate(placement.instance_type)
        except UnknownInstanceType:
            self._unknown(
                "on-demand-type",
                f"no bundled on-demand price for {placement.instance_type}",
            )
            return None
        return (end - start).total_seconds() / 3600.0 * rate

    # --- spot -------------------------------------------------------------------------------

    def _spot(self, placement: InstancePlacement, start: datetime, end: datetime) -> float | None:
        now = self._clock()
        # Windows only move forward, so history fetched from the first window's start
        # covers every later one; a refresh asks from the current window's start. Until
        # a due refresh succeeds the window waits (a stale price is a guess), and a failed
        # one is not retried on every heartbeat.
        if self._history is None or now - self._fetched_at >= self._refresh_seconds:
            if now - self._failed_at < self._retry_seconds:
                return None
            history = self._fetch(placement, start, end)
            if history is None:
                self._failed_at = now
                return None
            self._history, self._fetched_at = history, now
        try:
            return spot_cost(start, end, self._history)
        except CostError as exc:
            self._unknown("spot-history", str(exc))
            return None

    def _fetch(self, placement: InstancePlacement, start: datetime, end: datetime) -> list[PricePoint] | None:
        kwargs: dict[str, Any] = {
            "InstanceTypes": [placement.instance_type],
            "AvailabilityZone": placement.zone,
            "ProductDescriptions": list(LINUX_PRODUCTS),
            "StartTime": start,
            "EndTime": max(end, start + timedelta(seconds=1)),
        }
        try:
            entries = [
                entry
                for page in self._ec2.get_paginator("describe_spot_price_history").paginate(**kwargs)
                for entry in page.get("SpotPriceHistory", [])
                if entry.get("ProductDescription") in LINUX_PRODUCTS
                and entry.get("InstanceType") == placement.instance_type
                and entry.get("AvailabilityZone") == placement.zone
            ]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            self._unknown(f"api:{code}", f"ec2:DescribeSpotPriceHistory refused ({code})")
            return None
        except BotoCoreError as exc:
            self._unknown(f"api:{type(exc).__name__}", f"ec2:DescribeSpotPriceHistory failed ({exc})")
            return None
        by_time: dict[datetime, float] = {}
        for entry in entries:
            moment = entry["Timestamp"].astimezone(UTC)
            # Both Linux product names can report the same moment: the higher is the safe bound.
            by_time[moment] = max(by_time.get(moment, 0.0), float(entry["SpotPrice"]))
        if not by_time:
            self._unknown(
                "spot-history",
                f"EC2 has no spot price history for {placement.instance_type} in {placement.zone}",
            )
            return None
        return [PricePoint(at=at, usd_per_hour=price) for at, price in sorted(by_time.items())]

    def _unknown(self, cause: str, why: str) -> None:
        if cause in self._logged:
            return
        self._logged.add(cause)
        logger.warning(
            "instance price unknown: %s; its cost is not added to the job row (the budget guard "
            "counts only what is), until it can be priced",
            why,
        )
