"""beacons and receipts

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("thing_name", sa.String(128), sa.ForeignKey("devices.thing_name"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.UniqueConstraint("thing_name", "kind", "seq", name="uq_telemetry_thing_kind_seq"),
    )
    op.create_index("ix_telemetry_thing_name", "telemetry", ["thing_name"])
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("active_version", sa.String(64)))
        batch.add_column(sa.Column("last_beacon", sa.JSON()))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("last_beacon")
        batch.drop_column("active_version")
    op.drop_table("telemetry")
