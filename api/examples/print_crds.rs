//! Prints every CRD as YAML (what `tessera-operator crds` prints).
fn main() {
    for crd in tessera_api::crd::all() {
        match tessera_api::crd::to_yaml(&crd) {
            Ok(y) => println!("---\n{y}"),
            Err(e) => eprintln!("{e}"),
        }
    }
}
