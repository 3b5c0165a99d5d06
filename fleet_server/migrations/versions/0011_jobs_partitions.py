"""jobs partitions and replica heartbeats: fleet-server replicas share the device traffic

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

PARTITIONS = 64  # fleet_server.jobs.partitions.PARTITIONS; changing it needs a migration like this one


def upgrade() -> None:
    partitions = op.create_table(
        "jobs_partitions",
        sa.Column("partition", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("released_at", sa.DateTime(), nullable=True),
    )
    op.bulk_insert(partitions, [{"partition": p} for p in range(PARTITIONS)])
    op.create_table(
        "fleet_replicas",
        sa.Column("replica_id", sa.String(128), primary_key=True),
        sa.Column("nonce", sa.String(32), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fleet_replicas")
    op.drop_table("jobs_partitions")
