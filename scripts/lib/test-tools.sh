# Sourced by scripts/test.sh and scripts/test-packaging.sh: reads scripts/test-tools.txt.

TEST_TOOLS_LIST="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/test-tools.txt"

# Entries of the list as "PROGRAM PACKAGE" lines, for the given group (all when empty).
test_tools() {
    local group="${1:-}" prog pkg groups
    while read -r prog pkg groups _; do
        [[ -z "$prog" || "$prog" == \#* ]] && continue
        if [[ -z "$pkg" || -z "$groups" ]]; then
            echo "scripts/test-tools.txt: line for '$prog' needs PROGRAM PACKAGE GROUPS" >&2
            return 1
        fi
        [[ -z "$group" || ",$groups," == *",$group,"* ]] || continue
        echo "$prog $pkg"
    done <"$TEST_TOOLS_LIST"
}

# True when PROGRAM (a name on PATH, or an absolute path) is present.
test_tool_present() {
    if [[ "$1" == /* ]]; then [[ -e "$1" ]]; else command -v "$1" >/dev/null 2>&1; fi
}

# The packages of the group's missing entries, one per line, each once.
missing_test_packages() {
    local lines prog pkg
    lines=$(test_tools "${1:-}") || return 1
    while read -r prog pkg; do
        [[ -z "$prog" ]] && continue
        test_tool_present "$prog" || echo "$pkg"
    done <<<"$lines" | sort -u
}

# Entries of the group still missing (after an install), as "PROGRAM (PACKAGE)".
missing_test_tools() {
    local lines prog pkg
    lines=$(test_tools "${1:-}") || return 1
    while read -r prog pkg; do
        [[ -z "$prog" ]] && continue
        test_tool_present "$prog" || echo "$prog ($pkg)"
    done <<<"$lines"
}
