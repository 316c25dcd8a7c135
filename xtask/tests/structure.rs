//! The code's structure, checked on every crate's `src/` tree:
//!
//! - no import circle between modules: within each module, the graph of its
//!   child modules (an edge from A to B when anything under A names anything
//!   under B) is acyclic; a child naming its parent (its error type, say) is
//!   not a circle;
//! - no function longer than 100 lines outside tests;
//! - no `Result<_, String>` outside xtask (libraries have typed errors).
//!
//! Each check reports every offender with its file and line, so a failure
//! says where to look.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use syn::visit::Visit;

/// Longest a function may be, in lines from `fn` to its closing brace.
const MAX_FUNCTION_LINES: usize = 100;

/// Every crate root in the workspace: (crate root file, checked for
/// `Result<_, String>`).
fn crate_roots() -> Vec<(PathBuf, bool)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let roots = [
        ("api/src/lib.rs", true),
        ("bpf/src/lib.rs", true),
        ("operator/src/lib.rs", true),
        ("operator/src/main.rs", true),
        ("node-agent/src/lib.rs", true),
        ("node-agent/src/main.rs", true),
        ("waypoint/src/main.rs", true),
        ("tests/src/lib.rs", true),
        ("xtask/src/main.rs", false),
        ("xtask/bench/src/main.rs", false),
    ];
    roots.iter().map(|(p, s)| (repo.join(p), *s)).collect()
}

/// One module of a crate: its path from the crate root and what it names.
#[derive(Debug, Default)]
struct Module {
    file: PathBuf,
    /// Module paths (from the crate root) this module's code names.
    names: BTreeSet<Vec<String>>,
}

/// A crate's modules by path (the root is the empty path).
type Modules = BTreeMap<Vec<String>, Module>;

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string() == "test")
    })
}

fn is_test_fn(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let segments: Vec<String> = a
            .path()
            .segments
            .iter()
            .map(|s| s.ident.to_string())
            .collect();
        segments.last().is_some_and(|s| s == "test")
    })
}

/// The file a `mod name;` declared in `file` lives in.
fn child_file(file: &Path, name: &str) -> Result<PathBuf> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let dir = file.parent().context("module file has no directory")?;
    let dir = if matches!(stem, "lib" | "main" | "mod") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    for candidate in [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!("{}: no file for `mod {name};`", file.display())
}

/// Reads a crate's module tree from its root file.
fn load_crate(root: &Path) -> Result<Modules> {
    let mut modules = Modules::new();
    load_file(root, Vec::new(), &mut modules)?;
    Ok(modules)
}

fn load_file(file: &Path, path: Vec<String>, modules: &mut Modules) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed = syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
    load_items(file, &parsed.items, path, modules)
}

fn load_items(
    file: &Path,
    items: &[syn::Item],
    path: Vec<String>,
    modules: &mut Modules,
) -> Result<()> {
    let mut names = Names {
        module: path.clone(),
        found: BTreeSet::new(),
    };
    for item in items {
        match item {
            syn::Item::Mod(m) if is_cfg_test(&m.attrs) => {}
            syn::Item::Mod(m) => {
                let name = m.ident.to_string();
                let mut child = path.clone();
                child.push(name.clone());
                match &m.content {
                    Some((_, inner)) => load_items(file, inner, child, modules)?,
                    None => load_file(&child_file(file, &name)?, child, modules)?,
                }
            }
            other => names.visit_item(other),
        }
    }
    modules.insert(
        path,
        Module {
            file: file.to_path_buf(),
            names: names.found,
        },
    );
    Ok(())
}

/// Collects the module-relative paths a module's code names.
struct Names {
    module: Vec<String>,
    found: BTreeSet<Vec<String>>,
}

impl Names {
    fn record(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let absolute = match first.as_str() {
            "crate" => segments[1..].to_vec(),
            "self" => [self.module.clone(), segments[1..].to_vec()].concat(),
            "super" => {
                let mut base = self.module.clone();
                let mut rest = segments;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                [base, rest.to_vec()].concat()
            }
            // A child module named by its bare name.
            _ => [self.module.clone(), segments.to_vec()].concat(),
        };
        self.found.insert(absolute);
    }
}

fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push([prefix.clone(), vec![n.ident.to_string()]].concat()),
        syn::UseTree::Rename(r) => out.push([prefix.clone(), vec![r.ident.to_string()]].concat()),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| use_paths(t, prefix, out)),
    }
}

impl<'a> Visit<'a> for Names {
    fn visit_item_use(&mut self, item: &'a syn::ItemUse) {
        let mut paths = Vec::new();
        use_paths(&item.tree, &mut Vec::new(), &mut paths);
        paths.iter().for_each(|p| self.record(p));
    }

    fn visit_path(&mut self, path: &'a syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.record(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_item_mod(&mut self, item: &'a syn::ItemMod) {
        // Inline modules are loaded as modules of their own.
        let _ = item;
    }
}

/// The longest prefix of `path` that is a module.
fn resolve<'m>(modules: &'m Modules, path: &[String]) -> Option<&'m Vec<String>> {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get_key_value(&path[..n]).map(|(k, _)| k))
}

/// Edges between sibling modules: (parent, from child, to child).
fn sibling_edges(modules: &Modules) -> BTreeSet<(Vec<String>, String, String)> {
    let mut edges = BTreeSet::new();
    for (from, module) in modules {
        for name in &module.names {
            let Some(to) = resolve(modules, name) else {
                continue;
            };
            let common = from
                .iter()
                .zip(to.iter())
                .take_while(|(a, b)| a == b)
                .count();
            if common < from.len() && common < to.len() {
                let parent = from[..common].to_vec();
                edges.insert((parent, from[common].clone(), to[common].clone()));
            }
        }
    }
    edges
}

/// Every circle among one parent's children, as the children it passes.
fn circles(edges: &BTreeSet<(Vec<String>, String, String)>) -> Vec<String> {
    let mut by_parent: BTreeMap<&Vec<String>, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (parent, from, to) in edges {
        by_parent
            .entry(parent)
            .or_default()
            .entry(from)
            .or_default()
            .insert(to);
    }
    let mut found = Vec::new();
    for (parent, graph) in by_parent {
        for start in graph.keys() {
            if let Some(circle) = circle_from(&graph, start) {
                found.push(format!(
                    "in `{}`: {}",
                    display_path(parent),
                    circle.join(" -> ")
                ));
            }
        }
    }
    found
}

/// A shortest path from `start` back to itself, breadth first.
fn circle_from<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    start: &'a str,
) -> Option<Vec<&'a str>> {
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for &next in graph.get(node).into_iter().flatten() {
            if next == start {
                let mut path = vec![start, node];
                let mut at = node;
                while let Some(&p) = previous.get(at) {
                    path.insert(1, p);
                    at = p;
                }
                path.dedup();
                path.push(start);
                return Some(path);
            }
            if next != start && !previous.contains_key(next) {
                previous.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    None
}

fn display_path(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_string()
    } else {
        path.join("::")
    }
}

#[test]
fn no_module_is_part_of_an_import_circle() -> Result<()> {
    let mut found = Vec::new();
    for (root, _) in crate_roots() {
        let modules = load_crate(&root)?;
        for circle in circles(&sibling_edges(&modules)) {
            found.push(format!("{}: {circle}", root.display()));
        }
    }
    assert!(
        found.is_empty(),
        "module import circles:\n{}",
        found.join("\n")
    );
    Ok(())
}

/// Functions longer than the limit, with file and line.
struct LongFunctions<'f> {
    file: &'f Path,
    found: Vec<String>,
}

impl LongFunctions<'_> {
    fn check(&mut self, name: &syn::Ident, start: proc_macro2::Span, block: &syn::Block) {
        let first = start.start().line;
        let last = block.brace_token.span.close().end().line;
        let lines = last + 1 - first;
        if lines > MAX_FUNCTION_LINES {
            self.found.push(format!(
                "{}:{first}: fn {name} has {lines} lines",
                self.file.display()
            ));
        }
    }
}

impl<'a> Visit<'a> for LongFunctions<'_> {
    fn visit_item_mod(&mut self, item: &'a syn::ItemMod) {
        if !is_cfg_test(&item.attrs) {
            syn::visit::visit_item_mod(self, item);
        }
    }

    fn visit_item_fn(&mut self, item: &'a syn::ItemFn) {
        if !is_test_fn(&item.attrs) {
            self.check(&item.sig.ident, item.sig.fn_token.span, &item.block);
            syn::visit::visit_item_fn(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, item: &'a syn::ImplItemFn) {
        self.check(&item.sig.ident, item.sig.fn_token.span, &item.block);
        syn::visit::visit_impl_item_fn(self, item);
    }

    fn visit_trait_item_fn(&mut self, item: &'a syn::TraitItemFn) {
        if let Some(block) = &item.default {
            self.check(&item.sig.ident, item.sig.fn_token.span, block);
        }
        syn::visit::visit_trait_item_fn(self, item);
    }
}

/// `Result<_, String>` types, with file and line.
struct StringErrors<'f> {
    file: &'f Path,
    found: Vec<String>,
}

impl<'a> Visit<'a> for StringErrors<'_> {
    fn visit_item_mod(&mut self, item: &'a syn::ItemMod) {
        if !is_cfg_test(&item.attrs) {
            syn::visit::visit_item_mod(self, item);
        }
    }

    fn visit_path_segment(&mut self, segment: &'a syn::PathSegment) {
        if segment.ident == "Result"
            && let syn::PathArguments::AngleBracketed(args) = &segment.arguments
            && let Some(syn::GenericArgument::Type(syn::Type::Path(error))) =
                args.args.iter().nth(1)
            && error.path.is_ident("String")
        {
            let line = segment.ident.span().start().line;
            self.found
                .push(format!("{}:{line}: Result<_, String>", self.file.display()));
        }
        syn::visit::visit_path_segment(self, segment);
    }
}

/// Every file of every crate, parsed, with whether it is checked for
/// `Result<_, String>`.
fn parsed_files() -> Result<Vec<(PathBuf, syn::File, bool)>> {
    let mut files = Vec::new();
    let mut seen = BTreeSet::new();
    for (root, typed_errors) in crate_roots() {
        for module in load_crate(&root)?.values() {
            if seen.insert(module.file.clone()) {
                let text = std::fs::read_to_string(&module.file)?;
                files.push((module.file.clone(), syn::parse_file(&text)?, typed_errors));
            }
        }
    }
    Ok(files)
}

#[test]
fn no_function_outside_tests_is_longer_than_a_hundred_lines() -> Result<()> {
    let mut found = Vec::new();
    for (file, parsed, _) in parsed_files()? {
        let mut long = LongFunctions {
            file: &file,
            found: Vec::new(),
        };
        long.visit_file(&parsed);
        found.extend(long.found);
    }
    assert!(
        found.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        found.join("\n")
    );
    Ok(())
}

#[test]
fn library_code_has_typed_errors() -> Result<()> {
    let mut found = Vec::new();
    for (file, parsed, checked) in parsed_files()? {
        if checked {
            let mut errors = StringErrors {
                file: &file,
                found: Vec::new(),
            };
            errors.visit_file(&parsed);
            found.extend(errors.found);
        }
    }
    assert!(
        found.is_empty(),
        "string errors (use a thiserror enum):\n{}",
        found.join("\n")
    );
    Ok(())
}

#[test]
fn the_checks_find_what_they_look_for() -> Result<()> {
    let code = r#"
        mod a { use super::b::X; pub fn f() -> Result<(), String> { Ok(()) } }
        mod b { pub struct X; fn g() { crate::a::f(); } }
        mod c { use super::a; }
    "#;
    let parsed = syn::parse_file(code)?;
    let mut modules = Modules::new();
    load_items(Path::new("x.rs"), &parsed.items, Vec::new(), &mut modules)?;
    let found = circles(&sibling_edges(&modules));
    assert_eq!(
        found,
        vec!["in `crate`: a -> b -> a", "in `crate`: b -> a -> b"]
    );

    let mut errors = StringErrors {
        file: Path::new("x.rs"),
        found: Vec::new(),
    };
    errors.visit_file(&parsed);
    assert_eq!(errors.found, vec!["x.rs:2: Result<_, String>"]);

    let body = "let _x = 1;\n".repeat(MAX_FUNCTION_LINES);
    let long = syn::parse_file(&format!(
        "fn long() {{\n{body}}}\n#[test]\nfn t() {{\n{body}}}"
    ))?;
    let mut lengths = LongFunctions {
        file: Path::new("x.rs"),
        found: Vec::new(),
    };
    lengths.visit_file(&long);
    assert_eq!(
        lengths.found,
        vec![format!(
            "x.rs:1: fn long has {} lines",
            MAX_FUNCTION_LINES + 2
        )]
    );
    Ok(())
}
