"""devices, job executions and their event log

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("thing_name", sa.String(128), primary_key=True),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("region", sa.String(64)),
        sa.Column("customer", sa.String(128)),
        sa.Column("regulatory_domain", sa.String(64)),
        sa.Column("firmware", sa.String(64)),
        sa.Column("agent_version", sa.String(64)),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("registered_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime()),
    )
    op.create_index("ix_devices_sku", "devices", ["sku"])
    op.create_index("ix_devices_region", "devices", ["region"])
    op.create_table(
        "job_executions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("thing_name", sa.String(128), sa.ForeignKey("devices.thing_name"), nullable=False),
        sa.Column("campaign_id", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_details", sa.JSON(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("version_number", sa.Integer(), nullable=False),
        sa.Column("execution_number", sa.Integer(), nullable=False),
        sa.Column("queued_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime()),
        sa.Column("last_updated_at", sa.DateTime(), nullable=False),
        sa.Column("step_timeout_at", sa.DateTime()),
        sa.Column("in_progress_timeout_min", sa.Integer()),
        sa.Column("last_notified_at", sa.DateTime()),
        sa.UniqueConstraint("job_id", "thing_name", name="uq_execution_job_thing"),
    )
    op.create_index("ix_job_executions_job_id", "job_executions", ["job_id"])
    op.create_index("ix_job_executions_campaign_id", "job_executions", ["campaign_id"])
    op.create_index("ix_execution_thing_status", "job_executions", ["thing_name", "status"])
    op.create_table(
        "execution_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("execution_id", sa.Integer(), sa.ForeignKey("job_executions.id"), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_execution_events_execution_id", "execution_events", ["execution_id"])


def downgrade() -> None:
    op.drop_table("execution_events")
    op.drop_table("job_executions")
    op.drop_table("devices")
