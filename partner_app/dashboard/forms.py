"""Flask-WTF forms for the staff dashboard (CSRF on every POST)."""

from flask_wtf import FlaskForm
from wtforms import BooleanField, DateField, EmailField, PasswordField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Email, Length, Optional, Regexp

from partner_app.security.staff import ROLES


class LoginForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Email(check_deliverability=False),
                                             Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


class CodeForm(FlaskForm):
    """A six-digit code from an authenticator app."""

    code = StringField("Code from your authenticator app", validators=[
        DataRequired(), Regexp(r"^\s*\d{3}\s?\d{3}\s*$", message="Enter the 6 digits.")])


class ConfirmForm(FlaskForm):
    """An action with no fields but a CSRF token."""


class DisconnectForm(FlaskForm):
    """Disconnecting destroys the operator's keys: the public id must be typed back."""

    confirm = StringField("Type the operator's public id to confirm",
                          validators=[DataRequired(), Length(max=40)])
    local_only = BooleanField("Disconnect here even if Stora cannot be told "
                              "(Stora keeps the grant until the operator removes it)")


class StaffCreateForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Email(check_deliverability=False),
                                             Length(max=254)])
    role = SelectField("Role", choices=[SelectChoice(r, r) for r in ROLES], default="viewer")
    password = PasswordField("Initial password (at least 12 characters)", validators=[
        DataRequired(), Length(min=12, max=200)])


class AuditFilterForm(FlaskForm):
    """The audit log's filters, read from the query string (no CSRF: a GET changes nothing)."""

    class Meta:
        csrf = False

    actor = StringField("Actor", validators=[Optional(), Length(max=200)])
    action = StringField("Action", validators=[Optional(), Length(max=80),
                                               Regexp(r"^[a-z0-9_.]+$",
                                                      message="Letters, digits, '_' and '.'.")])
    operator = StringField("Operator", validators=[Optional(), Length(max=32),
                                                   Regexp(r"^op_[0-9a-f]+$",
                                                          message="An id like op_1a2b….")])
    since = DateField("From", validators=[Optional()])
    until = DateField("To", validators=[Optional()])
