"""The partner staff dashboard (``/staff``): see every operator, repair any of them.

Views are thin: they read through :mod:`partner_app.dashboard.queries` and act through
the same services the jobs and the CLI use. Importing this package registers every page.
"""

from partner_app.dashboard import audit_log, auth, jobs, overview, staff_accounts  # noqa: F401
from partner_app.dashboard.blueprint import bp

__all__ = ["bp"]
