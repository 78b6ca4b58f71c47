"""`shutdown -h now` of a rehearsal instance: the agent's shutdown command, locally.

On EC2 the agent shuts the machine down after the job succeeds and the instance (with
terminate-on-shutdown) terminates. Here the same command terminates the instance in moto:
its id comes from the instance's (fake) IMDS, the endpoint from AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import sys

from trainctl.agent.imds import ImdsClient, ImdsUnavailable


def main() -> int:
    import boto3

    try:
        instance_id = ImdsClient().instance_id()
    except ImdsUnavailable as exc:
        print(f"shutdown: {exc}", file=sys.stderr)
        return 1
    boto3.client("ec2").terminate_instances(InstanceIds=[instance_id])
    return 0


if __name__ == "__main__":
    sys.exit(main())
