"""Flask-WTF forms for the staff dashboard (CSRF on every POST)."""

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, Email, Length


class LoginForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Email(check_deliverability=False),
                                             Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


class ConfirmForm(FlaskForm):
    """An action with no fields but a CSRF token."""


class DisconnectForm(FlaskForm):
    """Disconnecting destroys the operator's keys: the public id must be typed back."""

    confirm = StringField("Type the operator's public id to confirm",
                          validators=[DataRequired(), Length(max=40)])
    local_only = BooleanField("Disconnect here even if Stora cannot be told "
                              "(Stora keeps the grant until the operator removes it)")
