"""Read an n-gram database from a test while another process may be writing it (read-only, no tables yet = no rows)."""

import sqlite3
from pathlib import Path


def query(db, sql, *params):
    if not Path(db).exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # no tables yet
        return []
    finally:
        con.close()
