"""volume files are unique per host and pool: one file, one volume row

Before this revision a VM's disk was ``{VM name}-root.qcow2`` while VM names are unique only per project, so two
projects could hold rows naming one file (issue 11). New volumes are named by their id; this adds the unique key
that makes a second row for one file impossible.

Rows that already share a file keep the oldest row's claim to it; each younger one is pointed at a file of its
own id that does not exist and marked ``error``, so nothing of the shared file is deleted and no VM boots another
project's disk by accident. The administrator decides (the log names them) whose data the shared file is.

Revision ID: 0010
Revises: 0009
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

log = logging.getLogger("corral.store")


def upgrade() -> None:
    connection = op.get_bind()
    volumes = sa.table(
        "volumes",
        sa.column("id", sa.String),
        sa.column("name", sa.String),
        sa.column("project", sa.String),
        sa.column("host", sa.String),
        sa.column("pool", sa.String),
        sa.column("path", sa.Text),
        sa.column("state", sa.String),
        sa.column("created_at", sa.DateTime),
    )
    rows = connection.execute(
        sa.select(
            volumes.c.id, volumes.c.name, volumes.c.project, volumes.c.host, volumes.c.pool, volumes.c.path
        ).order_by(volumes.c.created_at, volumes.c.id)
    ).all()
    owners: dict[tuple[str | None, str, str], str] = {}
    for row in rows:
        key = (row.host, row.pool, row.path)
        if key not in owners:
            owners[key] = row.id
            continue
        log.warning(
            "volume %s of project %s named the file %s of volume %s as well: it now names its own "
            "(missing) file and is marked error",
            row.name,
            row.project,
            row.path,
            owners[key],
        )
        connection.execute(
            volumes.update().where(volumes.c.id == row.id).values(path=f"vol-{row.id}.qcow2", state="error")
        )
    op.create_index("uq_volumes_host_pool_path", "volumes", ["host", "pool", "path"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_volumes_host_pool_path", table_name="volumes")
