"""The partner staff dashboard (``/staff``): see every operator, repair any of them.

Views are thin: they read through :mod:`partner_app.dashboard.queries` and act through
the same services the jobs and the CLI use. Importing this package registers every page.
"""

from partner_app.dashboard import (  # noqa: F401  (registers routes)
    audit_log,
    auth,
    events,
    indexes,
    jobs,
    operators,
    overview,
    staff_accounts,
)
from partner_app.dashboard.blueprint import bp

__all__ = ["bp"]
