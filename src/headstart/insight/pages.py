"""headstart's HTML pages: Jinja2 templates in ``templates/``, one stylesheet, escaping by the template engine.

The run report and the comparison are pages of :class:`Section` s (``sections.html``); the audit page and the
service's page have templates of their own. All of them extend ``base.html``, which inlines the shared stylesheet
(``style.css``) so that a page written into a run folder opens offline; the service's page links it instead, as a
static file of the app. Autoescape is on for every template: class names, file names and error messages reach a
page as text, never as markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import Any

import jinja2

TEMPLATES = "templates"  # folder of the headstart.insight package that holds the templates and the stylesheet


@dataclass(frozen=True)
class Link:
    """A table cell that links elsewhere: ``href`` is a relative path or a file URI."""

    href: str
    text: str


@dataclass
class Table:
    """A plain HTML table; a cell is any value, shown as its text, or a :class:`Link`."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    id: str = ""  # the element id, for tests and links into the page


@dataclass
class Section:
    """One block of a page of sections: a heading, then warnings, a table, a line of text and a figure."""

    title: str
    image: str | None = None  # file name under the page's figures folder (a data URI in a notebook's view)
    alt: str = ""
    table: Table | None = None
    text: str = ""  # a muted line under the table
    notes: list[str] = field(default_factory=list)  # warnings, shown first


@cache
def environment() -> jinja2.Environment:
    """The one template environment (built once): package templates, autoescape on, undefined names are errors."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("headstart.insight", TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the page instead of leaving a blank in it
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """The page made by ``template`` (a file name in ``templates/``) from ``context``."""
    return environment().get_template(template).render(**context)


def render_sections(title: str, subtitle: str, sections: Sequence[Section], figures: str = "figures") -> str:
    """A standalone page of sections: the stylesheet inline, figures linked by relative path under ``figures``."""
    return render("sections.html", title=title, subtitle=subtitle, sections=sections, figures=figures)


def stylesheet() -> str:
    """The text of the shared stylesheet (the service serves it as ``static/style.css``)."""
    return (files("headstart.insight") / TEMPLATES / "style.css").read_text(encoding="utf-8")
