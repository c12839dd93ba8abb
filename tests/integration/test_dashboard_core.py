"""The staff dashboard's core: sign-in (throttling, TOTP, session expiry), the overview,
jobs, audit log and staff pages, their authorisation, CSRF and query counts.

Real PostgreSQL or SQLite, real Redis, a real RQ worker (in-process, burst) for failed
jobs, the real sandbox for token refreshes. CSRF stays on: tests read the token from the
page like a browser does.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
import time_machine
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from sqlalchemy import event, func, insert, select

from partner_app.audit import AuditEntry
from partner_app.connections.models import Operator
from partner_app.db import db
from partner_app.queueing import get_redis
from partner_app.security.models import StaffUser
from partner_app.security.staff import LoginThrottle, verify_totp
from partner_app.sync.models import SyncRun
from partner_app.webhooks.models import WebhookEvent
from tests.staff_support import PASSWORD, csrf_token, make_staff, post, sign_in

PAGES = ["/staff/", "/staff/jobs", "/staff/audit", "/staff/accounts", "/staff/account"]


@pytest.fixture
def admin(client, clean_app):
    staff_id = make_staff(clean_app, "admin@partner.example", "admin")
    assert sign_in(client, "admin@partner.example").status_code == 302
    return staff_id


@pytest.fixture
def viewer_client(clean_app):
    make_staff(clean_app, "viewer@partner.example", "viewer")
    viewer = clean_app.test_client()
    assert sign_in(viewer, "viewer@partner.example").status_code == 302
    return viewer


def audit_rows(app, action: str) -> list[AuditEntry]:
    with app.app_context():
        rows = list(db.session.scalars(select(AuditEntry).where(AuditEntry.action == action)
                                       .order_by(AuditEntry.id)))
        db.session.remove()
    return rows


def staff_row(app, email: str) -> StaffUser | None:
    with app.app_context():
        row = db.session.scalars(select(StaffUser).where(StaffUser.email == email)).first()
        db.session.remove()
    return row


def text(response) -> str:
    return response.get_data(as_text=True)


def stat(html: str, name: str) -> int:
    match = re.search(rf'data-stat="{name}">.*?class="stat[^"]*">(\d+)<', html, re.S)
    assert match, name
    return int(match.group(1))


# -- the guard -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", PAGES)
def test_anonymous_visitors_are_sent_to_sign_in(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/staff/login?next=")


def test_an_anonymous_post_changes_nothing(client, clean_app):
    token = csrf_token(client)
    response = client.post("/staff/accounts", data={
        "csrf_token": token, "email": "intruder@partner.example", "role": "admin",
        "password": "x" * 20})
    assert response.status_code == 302 and "/staff/login" in response.headers["Location"]
    assert staff_row(clean_app, "intruder@partner.example") is None


def test_every_page_renders_for_an_admin(client, admin):
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "admin@partner.example" in text(response)


def test_every_page_renders_for_a_viewer_without_action_buttons(viewer_client):
    for path in PAGES:
        response = viewer_client.get(path)
        assert response.status_code == 200, path
    assert "Add a staff member" not in text(viewer_client.get("/staff/accounts"))


def test_the_overview_no_longer_lists_operators_or_issues_links(client, admin):
    html = text(client.get("/staff/"))
    assert "data-operator=" not in html and "New install link" not in html


# -- viewers and CSRF ----------------------------------------------------------------------
def failed_job(app, function: str = "partner_app.connections.jobs.refresh_operator_token",
               *args) -> str:
    """A job that really failed in a real RQ worker. Run outside an app context, the
    token job cannot reach the database and raises, as it would on a broken worker."""
    redis = get_redis(app)
    queue = Queue("default", connection=redis, serializer=JSONSerializer)
    job = queue.enqueue(function, *(args or (4242,)))
    SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(burst=True)
    assert job.id in queue.failed_job_registry.get_job_ids(cleanup=False)
    return job.id


def test_a_viewer_gets_403_on_every_post(clean_app, viewer_client):
    job_id = failed_job(clean_app)
    other = make_staff(clean_app, "other@partner.example", "viewer")
    posts = [
        f"/staff/jobs/default/{job_id}/requeue",
        f"/staff/jobs/default/{job_id}/delete",
        "/staff/accounts",
        f"/staff/accounts/{other}/deactivate",
        f"/staff/accounts/{other}/reactivate",
        f"/staff/accounts/{other}/reset-totp",
        "/staff/account/totp",
        "/staff/account/totp/confirm",
    ]
    for path in posts:
        response = post(viewer_client, path, {"email": "new@partner.example", "role": "admin",
                                              "password": "p" * 16, "code": "123456"})
        assert response.status_code == 403, path
    assert viewer_client.get(f"/staff/jobs/default/{job_id}/delete").status_code == 403
    queue = Queue("default", connection=get_redis(clean_app), serializer=JSONSerializer)
    assert job_id in queue.failed_job_registry.get_job_ids(cleanup=False)
    assert staff_row(clean_app, "new@partner.example") is None
    assert staff_row(clean_app, "other@partner.example").active


@pytest.mark.parametrize("path", ["/staff/accounts", "/staff/login", "/staff/logout",
                                  "/staff/account/totp"])
def test_a_post_without_its_csrf_token_is_rejected(client, admin, clean_app, path):
    response = client.post(path, data={"email": "new@partner.example", "role": "viewer",
                                       "password": "p" * 16})
    assert response.status_code == 400
    assert staff_row(clean_app, "new@partner.example") is None
    response = client.post(path, data={"csrf_token": "forged", "email": "new@partner.example",
                                       "role": "viewer", "password": "p" * 16})
    assert response.status_code == 400
    assert client.get("/staff/account").status_code == 200  # still signed in


def test_session_cookie_is_httponly_and_lax_and_secure_behind_https(client, clean_app,
                                                                    settings):
    make_staff(clean_app, "c@partner.example")
    response = sign_in(client, "c@partner.example")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # the test app is served over http://
    assert settings.replace(public_base_url="https://partner.example").secure_cookies


# -- sign-in -------------------------------------------------------------------------------
def test_sign_in_records_the_login_and_rehashes_a_weaker_hash(client, clean_app):
    from argon2 import PasswordHasher

    make_staff(clean_app, "old@partner.example")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    with clean_app.app_context():
        db.session.execute(StaffUser.__table__.update().values(password_hash=weak))
        db.session.commit()
    response = sign_in(client, "old@partner.example")
    assert response.status_code == 302 and response.headers["Location"] == "/staff/"
    row = staff_row(clean_app, "old@partner.example")
    assert row.password_hash != weak and "m=65536" in row.password_hash
    assert row.last_login_at is not None
    [login] = audit_rows(clean_app, "staff.login")
    assert login.detail["staff_id"] == row.id and login.actor == "old@partner.example"


def test_sign_in_goes_back_to_the_page_asked_for_but_never_off_site(client, clean_app):
    make_staff(clean_app, "n@partner.example")
    token = csrf_token(client)
    data = {"csrf_token": token, "email": "n@partner.example", "password": PASSWORD}
    response = client.post("/staff/login?next=//evil.example/", data=data)
    assert response.headers["Location"] == "/staff/"
    client.post("/staff/logout", data={"csrf_token": csrf_token(client, "/staff/")})
    response = client.post("/staff/login?next=/staff/jobs",
                           data={**data, "csrf_token": csrf_token(client)})
    assert response.headers["Location"] == "/staff/jobs"


def test_wrong_password_and_deactivated_accounts_are_refused(client, clean_app):
    staff_id = make_staff(clean_app, "w@partner.example")
    response = sign_in(client, "w@partner.example", "not the password")
    assert response.status_code == 200
    assert "did not match an active staff account" in text(response)
    with clean_app.app_context():
        db.session.get(StaffUser, staff_id).active = False
        db.session.commit()
    assert sign_in(client, "w@partner.example").status_code == 200
    assert client.get("/staff/").status_code == 302
    [failed, _] = audit_rows(clean_app, "staff.login_failed")
    assert failed.detail["reason"] == "credentials" and failed.detail["staff_id"] == staff_id


def test_logout_ends_the_session(client, admin, clean_app):
    response = client.post("/staff/logout", data={"csrf_token": csrf_token(client, "/staff/")})
    assert response.status_code == 302
    assert client.get("/staff/").status_code == 302
    assert len(audit_rows(clean_app, "staff.logout")) == 1


# -- throttling ----------------------------------------------------------------------------
def test_throttle_blocks_after_n_failures_per_account_then_lets_through_after_the_window(
        client, clean_app):
    make_staff(clean_app, "t@partner.example")
    limit = clean_app.extensions["settings"].staff_login_max_per_account
    for _ in range(limit):
        assert sign_in(client, "T@Partner.example", "wrong password").status_code == 200
    blocked = sign_in(client, "t@partner.example")  # even the right password
    assert blocked.status_code == 429
    assert "Too many failed sign-in attempts" in text(blocked)
    assert int(blocked.headers["Retry-After"]) > 0
    assert client.get("/staff/").status_code == 302
    [throttled] = audit_rows(clean_app, "staff.login_throttled")
    assert throttled.detail["email"] == "t@partner.example"
    assert len(audit_rows(clean_app, "staff.login_failed")) == limit  # blocked: not verified

    window = clean_app.extensions["settings"].staff_login_window
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=window + 1)):
        assert sign_in(client, "t@partner.example").status_code == 302
        assert client.get("/staff/").status_code == 200


def test_throttle_blocks_one_address_trying_many_accounts(client, clean_app):
    settings = clean_app.extensions["settings"]
    make_staff(clean_app, "real@partner.example")
    with clean_app.app_context():
        throttle = LoginThrottle.from_settings(get_redis(), settings)
        for i in range(settings.staff_login_max_per_ip - 1):  # the same as sign-in posts
            throttle.failed(f"guess{i}@partner.example", "127.0.0.1")
    assert sign_in(client, "guess@partner.example", "nope").status_code == 200  # the last one
    assert sign_in(client, "real@partner.example").status_code == 429
    other_address = clean_app.test_client()
    other_address.environ_base["REMOTE_ADDR"] = "10.0.0.9"
    assert sign_in(other_address, "real@partner.example").status_code == 302


def test_throttle_window_slides(clean_app):
    with clean_app.app_context():
        throttle = LoginThrottle(get_redis(), window=60, max_per_account=3, max_per_ip=100)
        t0 = 1_800_000_000.0
        states = [throttle.failed("s@partner.example", "10.1.1.1", now=t0 + i * 10)
                  for i in range(3)]
        assert [s.tripped for s in states] == [False, False, True]
        assert throttle.check("s@partner.example", "10.1.1.1", now=t0 + 25).retry_after == 35
        # the first failure leaves the window at t0+60: one slot frees, not all three
        assert throttle.check("s@partner.example", "10.1.1.1", now=t0 + 61).retry_after == 0
        throttle.failed("s@partner.example", "10.1.1.1", now=t0 + 61)
        assert throttle.check("s@partner.example", "10.1.1.1", now=t0 + 62).retry_after > 0
        throttle.succeeded("s@partner.example")
        assert throttle.check("s@partner.example", "10.1.1.1", now=t0 + 62).retry_after == 0


# -- TOTP ----------------------------------------------------------------------------------
def enrol(client) -> pyotp.TOTP:
    assert post(client, "/staff/account/totp").status_code == 302
    page = text(client.get("/staff/account"))
    key = re.search(r'data-testid="totp-key">([A-Z2-7]+)<', page).group(1)
    uri = re.search(r'<input id="totp-uri"[^>]*value="([^"]+)"', page)
    assert uri and uri.group(1).startswith("otpauth://totp/")
    return pyotp.TOTP(key)


def test_totp_enrolment_then_sign_in_with_a_code_used_once(client, admin, clean_app):
    totp = enrol(client)
    row = staff_row(clean_app, "admin@partner.example")
    assert row.totp_secret_ct.startswith("v1.") and totp.secret not in row.totp_secret_ct
    assert not row.totp_enabled  # not before a code proves the app has it

    assert post(client, "/staff/account/totp/confirm", {"code": "000000"}).status_code == 302
    assert not staff_row(clean_app, "admin@partner.example").totp_enabled
    now = datetime.now(UTC)
    code = totp.at(now)
    post(client, "/staff/account/totp/confirm", {"code": code})
    assert staff_row(clean_app, "admin@partner.example").totp_enabled
    assert len(audit_rows(clean_app, "staff.totp_enabled")) == 1
    client.post("/staff/logout", data={"csrf_token": csrf_token(client, "/staff/")})

    response = sign_in(client, "admin@partner.example")
    assert response.headers["Location"].startswith("/staff/login/code")
    assert client.get("/staff/").status_code == 302  # the password alone is not enough
    token = csrf_token(client, "/staff/login/code")
    reused = client.post("/staff/login/code", data={"csrf_token": token, "code": code})
    assert reused.status_code == 200 and "already used" in text(reused)
    with time_machine.travel(now + timedelta(seconds=30)):
        fresh = totp.at(datetime.now(UTC))
        response = client.post("/staff/login/code", data={"csrf_token": token, "code": fresh})
        assert response.status_code == 302 and response.headers["Location"] == "/staff/"
        assert client.get("/staff/").status_code == 200
    [login] = [r for r in audit_rows(clean_app, "staff.login") if r.detail["second_factor"]]
    assert login.detail["staff_id"] == admin


def test_totp_accepts_one_step_either_side_and_never_a_code_twice(app_ctx):
    from partner_app.security import staff

    vault = app_ctx.extensions["vault"]
    user = staff.create_staff("z@partner.example", PASSWORD, role="admin", actor="cli")
    staff.begin_totp_enrolment(user, vault=vault)
    totp = pyotp.TOTP(re.search(r"secret=([A-Z2-7]+)", staff.totp_uri(user, vault=vault))[1])
    t = 1_800_000_000.0
    assert staff.confirm_totp_enrolment(user, totp.at(t), vault=vault, now=t)
    assert not verify_totp(user, totp.at(t), vault=vault, now=t)  # reuse
    assert not verify_totp(user, totp.at(t + 90), vault=vault, now=t + 30)  # 2 steps ahead
    assert verify_totp(user, totp.at(t + 60), vault=vault, now=t + 30)  # 1 step ahead
    assert not verify_totp(user, totp.at(t + 30), vault=vault, now=t + 30)  # older than last
    assert verify_totp(user, totp.at(t + 600), vault=vault, now=t + 630)  # 1 step behind
    assert not verify_totp(user, totp.at(t + 1200), vault=vault, now=t + 1260)  # 2 behind
    assert not verify_totp(user, "12345", vault=vault, now=t + 2000)


def test_wrong_codes_count_towards_the_throttle(client, admin, clean_app):
    totp = enrol(client)
    post(client, "/staff/account/totp/confirm", {"code": totp.now()})
    client.post("/staff/logout", data={"csrf_token": csrf_token(client, "/staff/")})
    sign_in(client, "admin@partner.example")
    token = csrf_token(client, "/staff/login/code")
    limit = clean_app.extensions["settings"].staff_login_max_per_account
    wrong = f"{(int(totp.now()) + 1) % 1_000_000:06d}"
    for _ in range(limit):
        client.post("/staff/login/code", data={"csrf_token": token, "code": wrong})
    response = client.post("/staff/login/code", data={"csrf_token": token,
                                                      "code": totp.now()})
    assert response.status_code == 429
    assert [r.detail["reason"] for r in audit_rows(clean_app, "staff.login_failed")] == \
        ["totp"] * limit


def test_an_admin_resets_a_lost_second_factor(client, admin, clean_app):
    other_id = make_staff(clean_app, "lost@partner.example", "admin")
    other = clean_app.test_client()
    sign_in(other, "lost@partner.example")
    totp = enrol(other)
    post(other, "/staff/account/totp/confirm", {"code": totp.now()})
    assert staff_row(clean_app, "lost@partner.example").totp_enabled
    response = post(client, f"/staff/accounts/{other_id}/reset-totp", page="/staff/accounts")
    assert response.status_code == 302
    row = staff_row(clean_app, "lost@partner.example")
    assert row.totp_secret_ct is None and not row.totp_enabled
    [reset] = audit_rows(clean_app, "staff.totp_reset")
    assert reset.detail == {"by_staff_id": admin, "staff_id": other_id,
                            "email": "lost@partner.example"}


# -- session expiry ------------------------------------------------------------------------
def test_an_idle_session_expires(client, admin, clean_app):
    idle = clean_app.extensions["settings"].staff_session_idle
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=idle - 60)):
        assert client.get("/staff/").status_code == 200  # still fresh: marks it seen
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=2 * idle - 120)):
        assert client.get("/staff/").status_code == 200
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=3 * idle)):
        response = client.get("/staff/jobs")
        assert response.status_code == 302
        assert response.headers["Location"] == "/staff/login?next=/staff/jobs"
        assert "session expired" in text(client.get("/staff/login"))
        assert client.get("/staff/").status_code == 302


def test_an_active_session_still_ends_at_the_absolute_limit(client, admin, clean_app):
    settings = clean_app.extensions["settings"]
    step = settings.staff_session_idle - 60
    start = datetime.now(UTC)
    elapsed = step
    while elapsed < settings.staff_session_max:
        with time_machine.travel(start + timedelta(seconds=elapsed)):
            assert client.get("/staff/account").status_code == 200
        elapsed += step
    with time_machine.travel(start + timedelta(seconds=elapsed)):
        assert client.get("/staff/account").status_code == 302


def test_a_deactivated_member_is_signed_out_at_their_next_request(client, admin, clean_app,
                                                                  viewer_client):
    viewer = staff_row(clean_app, "viewer@partner.example")
    response = post(client, f"/staff/accounts/{viewer.id}/deactivate", page="/staff/accounts")
    assert response.status_code == 302
    assert viewer_client.get("/staff/").status_code == 302
    [row] = audit_rows(clean_app, "staff.deactivated")
    assert row.detail["by_staff_id"] == admin and row.detail["staff_id"] == viewer.id
    post(client, f"/staff/accounts/{viewer.id}/reactivate", page="/staff/accounts")
    assert staff_row(clean_app, "viewer@partner.example").active
    assert len(audit_rows(clean_app, "staff.reactivated")) == 1


def test_an_admin_cannot_deactivate_themselves(client, admin, clean_app):
    response = post(client, f"/staff/accounts/{admin}/deactivate", page="/staff/accounts")
    assert response.status_code == 302
    assert "cannot change your own" in text(client.get("/staff/accounts"))
    assert staff_row(clean_app, "admin@partner.example").active


# -- staff accounts ------------------------------------------------------------------------
def test_an_admin_adds_a_viewer_who_can_sign_in(client, admin, clean_app):
    response = post(client, "/staff/accounts", {"email": "New@Partner.example",
                                                "role": "viewer", "password": "p" * 14},
                    page="/staff/accounts")
    assert response.status_code == 302
    row = staff_row(clean_app, "new@partner.example")
    assert row.role == "viewer" and row.active
    [created] = audit_rows(clean_app, "staff.created")[-1:]
    assert created.detail["by_staff_id"] == admin and created.actor == "admin@partner.example"
    assert sign_in(clean_app.test_client(), "new@partner.example", "p" * 14).status_code == 302


@pytest.mark.parametrize(("form", "message"), [
    ({"email": "admin@partner.example", "role": "viewer", "password": "p" * 14},
     "already has an account"),
    ({"email": "short@partner.example", "role": "viewer", "password": "short"},
     "at least 12"),
    ({"email": "not-an-email", "role": "viewer", "password": "p" * 14}, "Invalid email"),
    ({"email": "r@partner.example", "role": "owner", "password": "p" * 14}, "Not a valid"),
])
def test_bad_staff_input_is_refused_with_a_reason_and_keeps_the_form(client, admin,
                                                                     clean_app, form,
                                                                     message):
    response = post(client, "/staff/accounts", form, page="/staff/accounts")
    assert response.status_code == 400
    assert message in text(response)
    if "@" in form["email"] and form["email"] != "admin@partner.example":
        assert staff_row(clean_app, form["email"]) is None
        assert f'value="{form["email"]}"' in text(response)


# -- jobs ----------------------------------------------------------------------------------
def test_failed_jobs_show_their_error_and_operator_and_can_be_retried(client, admin,
                                                                      clean_app):
    with clean_app.app_context():
        db.session.add(Operator(id=4242, public_id="op_00000000000042", status="active"))
        db.session.commit()
    job_id = failed_job(clean_app)
    html = text(client.get("/staff/jobs"))
    row = re.search(rf'data-failed-job="{job_id}".*?</tr>', html, re.S).group(0)
    assert "refresh_operator_token" in row and "op_00000000000042" in row
    assert "RuntimeError" in row and "application context" in row
    assert re.search(r'data-queue="default"><td><strong>default</strong></td><td>0</td>'
                     r'<td>0</td><td class="bad">1</td>', html)

    response = post(client, f"/staff/jobs/default/{job_id}/requeue", page="/staff/jobs")
    assert response.status_code == 302
    queue = Queue("default", connection=get_redis(clean_app), serializer=JSONSerializer)
    assert queue.job_ids == [job_id] and queue.failed_job_registry.count == 0
    [row] = audit_rows(clean_app, "job.requeued")
    assert row.detail["job_id"] == job_id and row.detail["by_staff_id"] == admin
    assert row.detail["operator_ids"] == [4242]
    again = post(client, f"/staff/jobs/default/{job_id}/requeue", page="/staff/jobs")
    assert again.status_code == 302
    assert "Nothing was retried" in text(client.get("/staff/jobs"))


def test_deleting_a_failed_job_asks_first(client, admin, clean_app):
    job_id = failed_job(clean_app)
    confirm = client.get(f"/staff/jobs/default/{job_id}/delete")
    assert confirm.status_code == 200 and "Delete the job" in text(confirm)
    queue = Queue("default", connection=get_redis(clean_app), serializer=JSONSerializer)
    assert queue.failed_job_registry.count == 1
    response = post(client, f"/staff/jobs/default/{job_id}/delete", page="/staff/jobs")
    assert response.status_code == 302
    assert queue.failed_job_registry.count == 0
    assert queue.fetch_job(job_id) is None
    assert len(audit_rows(clean_app, "job.deleted")) == 1


@pytest.mark.parametrize("path", ["/staff/jobs/nope/abc/requeue",
                                  "/staff/jobs/default/no:colons/requeue",
                                  "/staff/jobs/default/unknown-job/delete"])
def test_job_actions_on_unknown_jobs_change_nothing(client, admin, clean_app, path):
    response = post(client, path, page="/staff/jobs")
    assert response.status_code == 302
    assert "Nothing was" in text(client.get("/staff/jobs"))
    assert audit_rows(clean_app, "job.requeued") == audit_rows(clean_app, "job.deleted") == []


# -- the overview --------------------------------------------------------------------------
def test_overview_counts_real_token_refreshes_and_failures(client, admin, clean_app,
                                                           sandbox):
    from tests.integration.test_install_flow import LEEDS, install
    from tests.integration.test_token_lifecycle import expire_locally, token_for

    install(clean_app.test_client(), LEEDS)
    with clean_app.app_context():
        operator_id = db.session.scalars(select(Operator.id)).one()
        expire_locally(operator_id)
        token_for(clean_app, operator_id)  # one refresh at the sandbox
        expire_locally(operator_id)
        sandbox.admin("POST", "faults", json={"endpoint": "token", "status": 503,
                                              "count": -1, "grant_type": "refresh_token"})
        with pytest.raises(Exception):  # noqa: B017 (the token service's own error)
            token_for(clean_app, operator_id)
        db.session.remove()
    html = text(client.get("/staff/"))
    assert stat(html, "tokens-refreshed") == 1
    assert stat(html, "tokens-failed") == 1
    assert re.search(r'data-health="degraded">.*?class="stat">1<', html, re.S)


def test_overview_shows_deliveries_per_hour_failed_events_jobs_and_sync_progress(
        client, admin, clean_app):
    now = datetime.now(UTC)
    with clean_app.app_context():
        db.session.add(Operator(id=7, public_id="op_0000000000000007", status="active"))
        db.session.flush()
        ages = [0, 0, 0, 1, 5, 23, 25]  # hours ago; 25 is outside the chart
        db.session.execute(insert(WebhookEvent), [
            {"operator_id": 7, "event_id": f"ev_{i}", "event_type": "order.created",
             "status": "failed" if i < 2 else "processed", "signed_at": now,
             "received_at": now - timedelta(hours=age), "body": "{}", "headers": {}}
            for i, age in enumerate(ages)])
        db.session.add(SyncRun(name="orders", requested_by="cli", total=40, succeeded=10,
                               failed=2, skipped=0, status="running"))
        db.session.add(SyncRun(name="orders", requested_by="cli", total=5, succeeded=5,
                               status="completed"))
        db.session.commit()
    failed_job(clean_app)
    html = text(client.get("/staff/"))
    bars = [int(v) for v in re.findall(r'class="bar"[^>]*data-value="(\d+)"', html)]
    assert len(bars) == 24 and bars[-1] == 3 and bars[-2] == 1 and bars[-6] == 1
    assert bars[0] == 1 and sum(bars) == 6
    assert stat(html, "deliveries") == 6
    assert stat(html, "events-failed") == 2
    assert stat(html, "jobs-failed") == 1
    assert stat(html, "jobs-queued") == 0
    assert re.search(r'<progress max="40" value="12"', html)
    assert html.count("data-sync-run=") == 1  # only the running one
    assert "<script" not in html and "style=" not in html


# -- the audit log -------------------------------------------------------------------------
def seed_audit(app, n: int, *, operators: int = 3) -> None:
    with app.app_context():
        db.session.execute(insert(Operator), [
            {"id": 100 + i, "public_id": f"op_{100 + i:016x}", "status": "active"}
            for i in range(operators)])
        start = datetime(2026, 1, 1, tzinfo=UTC)
        db.session.execute(insert(AuditEntry), [
            {"created_at": start + timedelta(hours=i), "actor_type": "staff",
             "actor": f"s{i % 2}@partner.example",
             "action": "operator.connected" if i % 3 else "token.refreshed",
             "operator_id": 100 + i % operators, "detail": {"n": i}}
            for i in range(n)])
        db.session.commit()


def audit_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-audit="(\d+)"', html)]


def test_audit_log_pages_by_keyset_and_filters(client, admin, clean_app):
    seed_audit(clean_app, 120)
    with clean_app.app_context():
        login_id = db.session.scalar(select(func.max(AuditEntry.id)))  # the sign-in
    first = text(client.get("/staff/audit"))
    ids = audit_ids(first)
    assert len(ids) == 50 and ids == sorted(ids, reverse=True) and ids[0] == login_id
    older = re.search(r'href="(/staff/audit\?before=\d+)" rel="next"', first).group(1)
    second = audit_ids(text(client.get(older)))
    assert len(second) == 50 and max(second) < min(ids)
    third_html = text(client.get(f"/staff/audit?before={min(second)}"))
    # 120 seeded, the account's creation and its sign-in: 50 + 50 + 22
    assert len(audit_ids(third_html)) == 22 and 'rel="next"' not in third_html

    html = text(client.get("/staff/audit?actor=s1@partner.example&action=operator.connected"))
    rows = audit_ids(html)
    assert rows and len(rows) == len([i for i in range(120) if i % 2 == 1 and i % 3])
    html = text(client.get(f"/staff/audit?operator=op_{101:016x}"
                           "&since=2026-01-02&until=2026-01-02"))
    assert len(audit_ids(html)) == len([i for i in range(24, 48) if i % 3 == 1])
    assert f"op_{101:016x}" in html


@pytest.mark.parametrize("query", ["since=yesterday", "operator=op_ffffffffffffffff",
                                   "since=2026-02-01&until=2026-01-01", "action=DROP TABLE"])
def test_audit_log_bad_filters_are_explained_and_kept(client, admin, query):
    response = client.get(f"/staff/audit?{query}")
    assert response.status_code == 400
    html = text(response)
    assert 'class="flash error"' in html and "data-audit=" not in html


# -- statements per page -------------------------------------------------------------------
@contextmanager
def count_statements(app):
    with app.app_context():
        engine = db.engine
    seen: list[str] = []

    def listener(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", listener)


def seed_everything(app, n: int) -> None:
    """``n`` operators, audit entries, events, sync runs and staff members."""
    now = datetime.now(UTC)
    with app.app_context():
        base = db.session.scalar(select(func.coalesce(func.max(Operator.id), 0))) + 1
        states = ["active", "degraded", "needs_reauth", "pending", "disconnected"]
        db.session.execute(insert(Operator), [
            {"id": base + i, "public_id": f"op_{base + i:016x}", "status": states[i % 5]}
            for i in range(n)])
        db.session.execute(insert(AuditEntry), [
            {"created_at": now - timedelta(minutes=i), "actor_type": "system",
             "actor": "token-refresh", "action": "token.refreshed",
             "operator_id": base + i, "detail": {}} for i in range(n)])
        db.session.execute(insert(WebhookEvent), [
            {"operator_id": base + i, "event_id": f"ev_{base + i}", "event_type": "order.created",
             "status": "failed" if i % 4 == 0 else "processed", "signed_at": now,
             "received_at": now - timedelta(minutes=7 * i), "body": "{}", "headers": {}}
            for i in range(n)])
        db.session.execute(insert(SyncRun), [
            {"name": "orders", "requested_by": "cli", "status": "running", "total": n,
             "succeeded": i, "failed": 0, "skipped": 0, "record_timeline": False,
             "started_at": now} for i in range(min(n, 30))])
        db.session.commit()
    for i in range(min(n, 25)):
        make_staff(app, f"m{base + i}@partner.example", "viewer")


def test_statements_per_page_do_not_grow_with_the_data(client, admin, clean_app):
    def counts() -> dict[str, int]:
        result = {}
        for path in PAGES:
            with count_statements(clean_app) as seen:
                assert client.get(path).status_code == 200
            result[path] = len(seen)
        return result

    seed_everything(clean_app, 10)
    failed_job(clean_app)
    small = counts()
    seed_everything(clean_app, 200)
    for _ in range(3):
        failed_job(clean_app)
    large = counts()
    assert small == large, (small, large)
    assert max(large.values()) <= 12, large


def test_a_second_factor_sealed_under_a_retired_key_refuses_without_crashing(app_ctx):
    from partner_app.security import staff

    vault = app_ctx.extensions["vault"]
    user = staff.create_staff("k@partner.example", PASSWORD, role="admin", actor="cli")
    staff.begin_totp_enrolment(user, vault=vault)
    totp = pyotp.TOTP(re.search(r"secret=([A-Z2-7]+)", staff.totp_uri(user, vault=vault))[1])
    assert staff.confirm_totp_enrolment(user, totp.now(), vault=vault)
    user.totp_secret_ct = "v1.retired." + user.totp_secret_ct.split(".", 2)[2]
    db.session.commit()
    throttle = LoginThrottle.from_settings(get_redis(), app_ctx.extensions["settings"])
    result = staff.sign_in_with_code(user.id, totp.at(datetime.now(UTC) + timedelta(seconds=30)),
                                     ip="10.2.2.2", throttle=throttle, vault=vault)
    assert result.outcome == "invalid"
