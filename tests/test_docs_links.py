"""Every relative link in README.md and docs/ (recursively) points at a file or folder of the
repository, and every anchor at a heading of its target, with GitHub's heading slugs.

Links to other sites (http, https, mailto and any other scheme) are not followed; links in
fenced or indented code blocks and in inline code are not links.
"""

import pathlib
import re
import urllib.parse

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")
# [text](target) or ![alt](target), target optionally in <...>, optionally with a "title".
INLINE_LINK = re.compile(r"(?<!\\)!?\[(?:[^\]\\]|\\.)*\]"
                         r"\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_ID = re.compile(r"<[a-zA-Z][^>]*\s(?:id|name)=\"([^\"]+)\"")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
LINE_ANCHOR = re.compile(r"^L\d+(?:-L\d+)?$")


def markdown_files(root: pathlib.Path = REPO) -> list[pathlib.Path]:
  return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
  """(line number, line) of every line outside fenced and indented code blocks."""
  lines, fence, previous_blank, in_indented = [], None, True, False
  for number, line in enumerate(text.splitlines(), 1):
    if fence:
      closing = FENCE.match(line)
      if (closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence)
          and not line.strip().strip(fence[0])):
        fence = None
      previous_blank = False
      continue
    opening = FENCE.match(line)
    if opening:
      fence = opening.group(1)
      continue
    blank = not line.strip()
    indented = line.startswith("    ") or line.startswith("\t")
    in_indented = indented and not blank and (in_indented or previous_blank)
    if not in_indented:
      lines.append((number, line))
    previous_blank = blank
  return lines


def heading_text(markdown: str) -> str:
  """A heading's text as GitHub renders it: link text kept, code marks and tags dropped."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
  text = INLINE_CODE.sub(lambda m: m.group(2).strip(), text)
  return re.sub(r"<[^>]+>", "", text).strip()


def base_slug(text: str) -> str:
  """GitHub's slug of a heading: lowercase, every character but letters, digits, `_`, `-`
  and spaces removed, each space a hyphen."""
  return re.sub(r"[^\w\- ]", "", heading_text(text).lower()).replace(" ", "-")


def heading_slugs(headings: list[str]) -> list[str]:
  """The anchors of headings in document order: a repeated slug gets -1, -2, ..."""
  occurrences, slugs = {}, []
  for heading in headings:
    original = slug = base_slug(heading)
    while slug in occurrences:
      occurrences[original] += 1
      slug = f"{original}-{occurrences[original]}"
    occurrences[slug] = 0
    slugs.append(slug)
  return slugs


def anchors(path: pathlib.Path) -> set[str]:
  """Every anchor a Markdown file offers: its heading slugs and its HTML ids."""
  text = path.read_text(encoding="utf-8")
  headings, previous = [], ""
  for _, line in prose_lines(text):
    atx = ATX_HEADING.match(line)
    if atx:
      headings.append(atx.group(1) or "")
    elif (SETEXT_UNDERLINE.match(line) and previous.strip()
          and not re.match(r"^ {0,3}([-*+>|#]|\d+[.)])", previous)):
      headings.append(previous.strip())
    previous = "" if atx else line
  return set(heading_slugs(headings)) | set(HTML_ID.findall(text))


def link_targets(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line number, target) of every link and reference definition outside code."""
  targets = []
  for number, line in prose_lines(path.read_text(encoding="utf-8")):
    line = INLINE_CODE.sub("", line)
    found = INLINE_LINK.findall(line) + REFERENCE_DEFINITION.findall(line)
    targets += [(number, target.strip("<>")) for target in found]
  return targets


def broken_links(path: pathlib.Path, root: pathlib.Path = REPO) -> list[str]:
  """One line per relative link of `path` whose file or anchor does not exist."""
  broken = []
  for number, target in link_targets(path):
    if SCHEME.match(target):
      continue
    where = f"{path.relative_to(root)}:{number}: ({target})"
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / urllib.parse.unquote(file_part)).resolve() if file_part else path
    if not resolved.is_relative_to(root.resolve()):
      broken.append(f"{where} leaves the repository")
    elif not resolved.exists():
      broken.append(f"{where} no such file or folder")
    elif anchor and resolved.suffix == ".md":
      if urllib.parse.unquote(anchor) not in anchors(resolved):
        broken.append(f"{where} no heading with this anchor in {resolved.name}")
    elif anchor and not LINE_ANCHOR.match(anchor):
      broken.append(f"{where} an anchor into a file that is not Markdown")
  return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
  broken = broken_links(path)
  assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_are_found():
  names = {str(p.relative_to(REPO)) for p in markdown_files()}
  assert {"README.md", "docs/design.md", "docs/results/compare-cpu/results.md"} <= names


def test_slugs_follow_github_rules():
  assert heading_slugs([
      "8. Experiment protocols",
      "4.3 Adaptive refresh interval (a reconstruction)",
      "The Sophia family's operating regime: 10-50 % unclipped",
      "Gradient accumulation with optax.MultiSteps",
      "`slj.labels` and [sophia_lambda](x.md) Table 1",
      "Notes", "Notes", "Notes-1", "Notes",
  ]) == [
      "8-experiment-protocols",
      "43-adaptive-refresh-interval-a-reconstruction",
      "the-sophia-familys-operating-regime-10-50--unclipped",
      "gradient-accumulation-with-optaxmultisteps",
      "sljlabels-and-sophia_lambda-table-1",
      "notes", "notes-1", "notes-1-1", "notes-2",
  ]


def test_a_broken_file_or_anchor_is_reported_and_code_is_not_read(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Two words\n\nTitle\n---\n")
  page = tmp_path / "README.md"
  page.write_text("\n".join([
      "# Page",                                                      # 1
      "[ok](docs/other.md#two-words) [ok](#page) [ok](docs/other.md#title)",
      "[missing file](docs/gone.md) [missing anchor](docs/other.md#three-words)",
      "[self](#nowhere) [site](https://example.com/#x) [mail](mailto:a@b.c)",
      "`[in code](gone.md)` [out](../outside.md) [folder](docs/)",    # 5
      "```",
      "[in a fence](gone.md)",
      "```",
      "",
      "    [indented code](gone.md)",                                 # 10
      "",
      "[ref]: docs/gone-too.md",
  ]) + "\n")
  assert broken_links(page, root=tmp_path) == [
      "README.md:3: (docs/gone.md) no such file or folder",
      "README.md:3: (docs/other.md#three-words) no heading with this anchor in other.md",
      "README.md:4: (#nowhere) no heading with this anchor in README.md",
      "README.md:5: (../outside.md) leaves the repository",
      "README.md:12: (docs/gone-too.md) no such file or folder",
  ]
