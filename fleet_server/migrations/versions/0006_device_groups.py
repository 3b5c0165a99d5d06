"""static device groups

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_groups",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("description", sa.String(1024), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "device_group_members",
        sa.Column(
            "group_name",
            sa.String(128),
            sa.ForeignKey("device_groups.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("thing_name", sa.String(128), sa.ForeignKey("devices.thing_name"), primary_key=True),
    )
    op.create_index("ix_device_group_members_thing_name", "device_group_members", ["thing_name"])


def downgrade() -> None:
    op.drop_index("ix_device_group_members_thing_name", "device_group_members")
    op.drop_table("device_group_members")
    op.drop_table("device_groups")
