"""Storage: the jobs table, the idempotency table, the checkpoint bucket, the ECR repo."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.config import TrainctlConfig
from infra.constructs.nag import acknowledge
from trainctl_core.settings import (
    IDEMPOTENCY_PARTITION_KEY,
    IDEMPOTENCY_TTL_ATTRIBUTE,
    JOBS_INDEXES,
    JOBS_PARTITION_KEY,
)


class Storage(Construct):
    """Everything stateful. Removal policy comes from the stage (prod retains)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: TrainctlConfig) -> None:
        super().__init__(scope, construct_id)
        self._config = config
        self._removal = config.removal
        self.jobs_table = self._build_jobs_table()
        self.idempotency_table = self._build_idempotency_table()
        self.access_logs_bucket = self._build_access_logs_bucket()
        self.checkpoint_bucket = self._build_checkpoint_bucket()
        self.repository = self._build_repository()

    def _build_jobs_table(self) -> dynamodb.Table:
        table = dynamodb.Table(
            self,
            "JobsTable",
            partition_key=dynamodb.Attribute(name=JOBS_PARTITION_KEY, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,  # $0 at idle
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            # The AWS managed key is free; a customer key would cost $1/month at idle.
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            deletion_protection=self._removal is RemovalPolicy.RETAIN,
            removal_policy=self._removal,
        )
        # Handlers map an EC2 event (instance id only) to its job through these indexes:
        # the job's current instance, and the instance whose loss it recorded last (so a
        # late event about a replaced instance is a stale attempt, not an unmanaged one).
        for index_name, attribute in JOBS_INDEXES.items():
            table.add_global_secondary_index(
                index_name=index_name,
                partition_key=dynamodb.Attribute(name=attribute, type=dynamodb.AttributeType.STRING),
                # Keys only: the handlers re-read the row consistently after the (eventually
                # consistent) index hit, and a full projection would copy the whole row into
                # the index on every heartbeat write.
                projection_type=dynamodb.ProjectionType.KEYS_ONLY,
            )
        return table

    def _build_idempotency_table(self) -> dynamodb.Table:
        # Separate from the jobs table: Powertools owns its schema and records expire by TTL.
        return dynamodb.Table(
            self,
            "IdempotencyTable",
            partition_key=dynamodb.Attribute(
                name=IDEMPOTENCY_PARTITION_KEY, type=dynamodb.AttributeType.STRING
            ),
            time_to_live_attribute=IDEMPOTENCY_TTL_ATTRIBUTE,
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            # Short-lived records only: always safe to delete with the stack.
            removal_policy=RemovalPolicy.DESTROY,
        )

    def _build_access_logs_bucket(self) -> s3.Bucket:
        bucket = s3.Bucket(
            self,
            "AccessLogsBucket",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            # S3 server access logging only delivers to SSE-S3 buckets.
            encryption=s3.BucketEncryption.S3_MANAGED,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[s3.LifecycleRule(id="expire-access-logs", expiration=Duration.days(90))],
            removal_policy=self._removal,
        )
        acknowledge(
            bucket, "AwsSolutions-S1", "This is the access-log bucket; logging it to itself would loop."
        )
        return bucket

    def _build_checkpoint_bucket(self) -> s3.Bucket:
        # No age-based expiry of current objects by default: the newest checkpoint of a
        # paused or long job may be the oldest object in the bucket, and an age rule would
        # also delete a checkpoint's files before its (younger) manifest. The Checkpointer
        # keeps the newest N per job; what it deletes becomes a noncurrent version.
        rules = [
            # Aborted multipart uploads (a reclaimed instance mid-upload) otherwise bill forever.
            s3.LifecycleRule(
                id="abort-incomplete-uploads", abort_incomplete_multipart_upload_after=Duration.days(1)
            ),
            s3.LifecycleRule(
                id="expire-noncurrent-versions",
                noncurrent_version_expiration=Duration.days(self._config.noncurrent_version_days),
                expired_object_delete_marker=True,
            ),
        ]
        if self._config.checkpoint_expiry_days > 0:
            # Opt-in only (trainctl:checkpoint_expiry_days); docs/DEPLOY.md warns what it costs.
            rules.append(
                s3.LifecycleRule(
                    id="expire-old-checkpoints",
                    expiration=Duration.days(self._config.checkpoint_expiry_days),
                )
            )
        return s3.Bucket(
            self,
            "CheckpointBucket",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            encryption=s3.BucketEncryption.S3_MANAGED,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            # Versioning guards the newest checkpoint against an overwrite by a fenced agent.
            versioned=True,
            lifecycle_rules=rules,
            server_access_logs_bucket=self.access_logs_bucket,
            server_access_logs_prefix="checkpoint-bucket/",
            removal_policy=self._removal,
        )

    def _build_repository(self) -> ecr.Repository:
        mutability = (
            ecr.TagMutability.IMMUTABLE if self._config.ecr_immutable_tags else ecr.TagMutability.MUTABLE
        )
        return ecr.Repository(
            self,
            "TrainingImages",
            image_scan_on_push=True,
            image_tag_mutability=mutability,
            encryption=ecr.RepositoryEncryption.AES_256,
            lifecycle_rules=[
                ecr.LifecycleRule(
                    description="Drop untagged layers after a day",
                    tag_status=ecr.TagStatus.UNTAGGED,
                    max_image_age=Duration.days(1),
                    rule_priority=1,
                ),
                ecr.LifecycleRule(
                    description="Keep the newest images only",
                    tag_status=ecr.TagStatus.ANY,
                    max_image_count=self._config.ecr_max_images,
                    rule_priority=2,
                ),
            ],
            removal_policy=self._removal,
        )
