fn main() {
    println!("iscsi-bypass {}", env!("ISCSI_BYPASS_GIT_REV"));
}
