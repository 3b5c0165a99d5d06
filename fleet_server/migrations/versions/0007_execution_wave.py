"""the campaign wave that queued an execution

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_executions") as batch:
        batch.add_column(sa.Column("wave", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_executions") as batch:
        batch.drop_column("wave")
