"""The specification the code cites ("GON-SPEC x.y") is in the repository, and every citation names a section."""
import re

from conftest import REPO

SPEC = REPO / "docs" / "spec.md"
CITATION = re.compile(r"GON-SPEC[ §]*((?:\d+(?:\.\d+)?(?:, | and |,? ?)?)+)")


def _sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", SPEC.read_text(), flags=re.MULTILINE))


def test_spec_has_the_sections_the_code_is_organised_by():
    sections = _sections()
    assert {str(n) for n in range(1, 11)} <= sections
    assert {"2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "4.1", "4.2", "4.3", "4.4", "4.5", "4.6"} <= sections


def test_every_citation_resolves_to_a_section():
    sections = _sections()
    files = [REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("benchmarks/*.md")]
    for folder in ("gonjax", "experiments", "benchmarks", "tests"):
        files += (REPO / folder).rglob("*.py")
    cited = {}
    for file in files:
        for match in CITATION.finditer(file.read_text()):
            for number in re.findall(r"\d+(?:\.\d+)?", match.group(1)):
                cited.setdefault(number, file.relative_to(REPO))
    assert len(cited) >= 20  # the code does cite the spec throughout
    unresolved = {number: str(file) for number, file in cited.items() if number not in sections}
    assert not unresolved, unresolved
