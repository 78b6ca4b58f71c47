"""The DynamoDB tables' shape as CreateTable requests, built from the same constants the
stack builds them from (`infra/constructs/storage.py`; `tests/infra` checks that the
synthesized tables match these).

For tests and benchmarks that need the tables in moto without synthesizing the stack
(the rehearsal creates them from the synthesized template instead). boto3-free.
"""

from __future__ import annotations

from typing import Any

from trainctl_core.settings import IDEMPOTENCY_PARTITION_KEY, JOBS_INDEXES, JOBS_PARTITION_KEY


def jobs_table_request(table_name: str, *, projection: str = "KEYS_ONLY") -> dict[str, Any]:
    """`create_table` arguments for the jobs table and its lookup indexes (keys only as
    deployed; `projection` lets a test widen them)."""
    attributes = [JOBS_PARTITION_KEY, *JOBS_INDEXES.values()]
    return {
        "TableName": table_name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": name, "AttributeType": "S"} for name in attributes],
        "KeySchema": [{"AttributeName": JOBS_PARTITION_KEY, "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": index,
                "KeySchema": [{"AttributeName": attribute, "KeyType": "HASH"}],
                "Projection": {"ProjectionType": projection},
            }
            for index, attribute in JOBS_INDEXES.items()
        ],
    }


def idempotency_table_request(table_name: str) -> dict[str, Any]:
    """`create_table` arguments for the handlers' Powertools idempotency table."""
    return {
        "TableName": table_name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": IDEMPOTENCY_PARTITION_KEY, "AttributeType": "S"}],
        "KeySchema": [{"AttributeName": IDEMPOTENCY_PARTITION_KEY, "KeyType": "HASH"}],
    }
