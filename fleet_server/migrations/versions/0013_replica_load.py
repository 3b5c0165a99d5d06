"""replica load: each fleet-server replica's jobs-bridge load in its heartbeat, so the one
ticking a campaign holds new notifications while any replica's jobs service is saturated

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fleet_replicas") as batch:
        batch.add_column(sa.Column("jobs_load", sa.Float(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("fleet_replicas") as batch:
        batch.drop_column("jobs_load")
